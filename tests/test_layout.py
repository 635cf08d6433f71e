"""The package layout and import boundaries of docs/architecture.md hold after install."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
    return names


def _forbidden(folder: str, prefixes: tuple[str, ...]) -> list[str]:
    hits = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(prefixes):
                hits.append(f"{path.relative_to(ROOT)} imports {name}")
    return hits


def test_no_bare_top_level_packages_after_install(tmp_path):
    # From a neutral folder, so the repo root is not on sys.path. A top-level `kernels` may exist:
    # Hugging Face's package (transformers >= 5.25 needs it), never our folder.
    code = ("import importlib.util as u, json; s = {n: u.find_spec(n) "
            "for n in ['engine', 'kernels', 'studio', 'resources']}; "
            "print(json.dumps({n: v and (v.origin or str(list(v.submodule_search_locations))) "
            "for n, v in s.items()}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                                    text=True, check=True).stdout)
    assert out["engine"] is None and out["studio"] is None and out["resources"] is None
    assert out["kernels"] is None or str(ROOT / "kernels") not in out["kernels"], out["kernels"]
    found = subprocess.run([sys.executable, "-c", "import cpt_studio.engine, cpt_studio.kernels, "
                            "cpt_studio.studio, cpt_studio.resources"], cwd=tmp_path)
    assert found.returncode == 0


def test_engine_and_kernels_never_import_the_gui():
    gui = ("PySide6", "pyqtgraph", "cpt_studio.studio", "..studio", "shiboken6")
    assert _forbidden("engine", gui) == []
    assert _forbidden("kernels", gui) == []


def test_kernels_never_import_the_engine():
    assert _forbidden("kernels", ("cpt_studio.engine", "..engine")) == []


def test_headless_cli_loads_no_qt(tmp_path):
    code = ("import sys, cpt_studio.engine.cli, cpt_studio.engine.train.loop, cpt_studio.engine.runs.runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_python_package_folder_is_listed_in_pyproject():
    """A wheel (`pip install .`) holds only the packages pyproject names: a missing one breaks it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for dotted, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *rel)))
    assert found == listed


def _lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """import-linter over the contracts in `config` (pyproject's [tool.importlinter])."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: install the test extras (./install.sh --test)")
    env = None
    if pythonpath is not None:
        import os
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(lint), "--no-cache", "--no-logo", str(config)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    out = _lint_imports(ROOT / "pyproject.toml", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _scratch_copy(tmp_path: Path) -> Path:
    """engine/, kernels/, studio/ laid out as the cpt_studio import root, with pyproject.toml."""
    root = tmp_path / "scratch"
    for folder in ("engine", "kernels", "studio"):
        shutil.copytree(ROOT / folder, root / "cpt_studio" / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("module, line, broken", [
    # the data room reaching up into the training loop
    ("engine/data/batches.py", "from cpt_studio.engine.train import loop",
     "cpt_studio.engine.data is not allowed to import cpt_studio.engine.train"),
    # the run store (below the model room) importing it lazily, inside a function
    ("engine/runs/events.py", "def _late():\n    from ..model import adapters",
     "cpt_studio.engine.runs is not allowed to import cpt_studio.engine.model"),
    # the import cycle corpus <-> corpus_arrow coming back
    ("engine/data/corpus_arrow.py", "from .corpus import clean_text",
     "cpt_studio.engine.data.corpus_arrow is not allowed to import cpt_studio.engine.data.corpus"),
    # an indirect one: engine -> kernels (allowed) -> PySide6 (not allowed from either)
    ("engine/units.py", "from cpt_studio.kernels import qt_probe",
     "cpt_studio.engine.units -> cpt_studio.kernels.qt_probe"),
])
def test_a_wrong_import_in_a_scratch_copy_breaks_the_contracts(tmp_path, module, line, broken):
    root = _scratch_copy(tmp_path)
    assert _lint_imports(root / "pyproject.toml", root, root).returncode == 0
    if "qt_probe" in line:
        (root / "cpt_studio" / "kernels" / "qt_probe.py").write_text("import PySide6\n")
    target = root / "cpt_studio" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    out = _lint_imports(root / "pyproject.toml", root, root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert broken in " ".join(out.stdout.split()), out.stdout
