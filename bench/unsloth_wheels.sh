#!/usr/bin/env bash
# Wheels for the Unsloth side of bench/compare.py (issue 12), for the device image, downloaded here
# (a machine that reaches PyPI) into a folder the device tool carries:
#
#   bash bench/unsloth_wheels.sh                  # -> .whl_unsloth/ (+ a slim bitsandbytes wheel)
#   SLIM_BNB=0 bash bench/unsloth_wheels.sh DIR   # without the bnb wheel: carry .whl too then
#
# The device image has torch 2.11 (CUDA 13.0), transformers 5.17, peft 0.21, triton 3.6, accelerate,
# pandas, pyarrow, ... on Python 3.12, and neither bitsandbytes nor datasets. So: unsloth and
# unsloth_zoo, trl (<= 1.15.0, unsloth's pin), cut_cross_entropy, torchao, msgspec, tyro, and what
# those need that the image lacks: datasets (unsloth_zoo.training_utils and trl import it at
# import time) with dill and multiprocess, tyro's typeguard and docstring_parser. Wheels for the
# device (cp312, manylinux x86_64), never this machine's, and --no-deps: the list is the closure.
#
# Two wheels are repacked smaller (a valid wheel: the dropped files' RECORD lines go too):
#   - unsloth: without studio/ (the web UI, ~27 of its 28 MB; training never imports it);
#   - bitsandbytes (SLIM_BNB=1, the default): only its CUDA 13.x and CPU libraries (torch 2.11 is
#     cu130, and bnb loads libbitsandbytes_cuda<torch.version.cuda>.so), 43 MB -> a few MB. The
#     folder then replaces .whl/ for these runs: carry .whl_unsloth alone (bench/device_vs_unsloth.sh
#     installs .whl/ only when this folder has no bitsandbytes wheel).
# The device tool carries 64 MiB in all (the tracked tree counts too); the script prints the sizes.
# Versions: pinned below (those of issue 12's measurement); override with e.g. UNSLOTH=2026.10.9.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl_unsloth}
PY=${PYTHON:-python3}
SLIM_BNB=${SLIM_BNB:-1}
UNSLOTH=${UNSLOTH:-2026.10.9}
WHEELS=(
  "unsloth==$UNSLOTH" "unsloth_zoo==${UNSLOTH_ZOO:-$UNSLOTH}" "trl==${TRL:-1.15.0}"
  cut_cross_entropy==25.1.1 torchao==0.18.0 msgspec==0.23.0 tyro==1.0.17
  typeguard==4.6.1 docstring_parser==0.18.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
)
if [ "$SLIM_BNB" = 1 ]; then WHEELS+=(bitsandbytes==0.50.2); fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "${WHEELS[@]}"

rm -rf "$DIR"
mkdir -p "$DIR"
# Repack (or copy) each wheel into DIR; print what each holds and what the device still lacks.
"$PY" - "$tmp" "$DIR" <<'EOF'
import base64, csv, hashlib, io, re, sys, zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])

def keep_unsloth(path):          # the web UI: a top-level package of its own in the wheel
    return not path.startswith("studio/")

def keep_bnb(path):              # CUDA 13.x and CPU libraries; all the Python files
    name = path.rsplit("/", 1)[-1]
    if not name.startswith("libbitsandbytes_"):
        return True
    return name.startswith(("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))

RULES = {"unsloth": keep_unsloth, "bitsandbytes": keep_bnb}

def repack(wheel: Path, keep, out: Path) -> None:
    """Copy `wheel` to `out` without the files `keep` refuses, and without their RECORD lines."""
    with zipfile.ZipFile(wheel) as zin:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        names = [n for n in zin.namelist() if n == record or keep(n)]
        rows = list(csv.reader(io.StringIO(zin.read(record).decode("utf-8"))))
        kept = set(names)
        rows = [r for r in rows if r and r[0] in kept]
        listed = {r[0] for r in rows}
        missing = [n for n in names if n not in listed and not n.endswith("/")]
        assert not missing, f"{wheel.name}: files without a RECORD line: {missing[:5]}"
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for name in names:
                info = zin.getinfo(name)
                data = text.getvalue().encode("utf-8") if name == record else zin.read(name)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)

def check(wheel: Path) -> None:
    """Every RECORD line's hash and size match, and every file has one (what pip checks)."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        for name in z.namelist():
            if name.endswith("/") or name == record:
                continue
            _, digest, size = rows[name]
            data = z.read(name)
            algo, _, want = digest.partition("=")
            got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
            assert got == want and int(size) == len(data), f"{wheel.name}: {name} does not match"
        assert set(rows) - {record} <= set(z.namelist()), f"{wheel.name}: RECORD lists absent files"

for wheel in sorted(src.glob("*.whl")):
    project = re.split(r"-\d", wheel.name, maxsplit=1)[0].lower().replace("-", "_")
    out = dst / wheel.name
    if project in RULES:
        repack(wheel, RULES[project], out)
        check(out)
        print(f"  {wheel.name}: repacked, {wheel.stat().st_size / 1e6:.1f} -> {out.stat().st_size / 1e6:.1f} MB")
    else:
        out.write_bytes(wheel.read_bytes())
        print(f"  {wheel.name}: {out.stat().st_size / 1e6:.1f} MB")

# What the wheels require (Requires-Dist without extras, markers for Linux x86_64 / CPython 3.12)
# that neither the folder nor the device image has (image: KINDS.md's package list, 2026-11-17).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
# Required by metadata but not imported on the training path (read from the code, issue 12):
NOT_NEEDED = {"xformers": "optional attention backend (unsloth falls back to SDPA); a large binary",
              "hf_transfer": "only with HF_HUB_ENABLE_HF_TRANSFER", "diffusers": "diffusion models",
              "pydantic": "CLI / Studio", "structlog": "CLI / Studio", "json5": "CLI / Studio",
              "nest_asyncio": "CLI / Studio", "bitsandbytes": "carried in .whl/ (SLIM_BNB=0)"}

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

have = {norm(n) for n in IMAGE.split()}
env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "python_version": "3.12", "implementation_name": "cpython", "os_name": "posix"}
for wheel in dst.glob("*.whl"):
    have.add(norm(re.split(r"-\d", wheel.name, maxsplit=1)[0]))
lacking = {}
for wheel in sorted(dst.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.split(":", 1)[1].partition(";")
        if "extra" in marker:
            continue
        try:   # packaging is everywhere pip is; without it, no marker is dropped
            from packaging.markers import Marker
            if marker.strip() and not Marker(marker).evaluate(env):
                continue
        except ImportError:
            pass
        name = norm(re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1))
        if name not in have:
            lacking.setdefault(name, set()).add(wheel.name.split("-")[0])
for name, by in sorted(lacking.items()):
    why = NOT_NEEDED.get(name, "NOT CARRIED: check whether training imports it")
    print(f"  not carried: {name} (required by {', '.join(sorted(by))}): {why}")
EOF

# The device tool carries at most 64 MiB: the tracked tree + untracked-not-ignored files + carry.
size() { local s=0 f; for f in "$@"; do [ -f "$f" ] && s=$((s + $(stat -c %s "$f"))); done; echo $s; }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
folder=$(size "$DIR"/*.whl)
bnb=0
ls "$DIR"/bitsandbytes-*.whl >/dev/null 2>&1 || bnb=$(size .whl/bitsandbytes-*.whl)
total=$((tree + folder + bnb))
limit=$((64 * 1024 * 1024))
awk -v d="$DIR" -v f="$folder" -v t="$tree" -v b="$bnb" -v s="$total" 'BEGIN {
  printf "%s: %.1f MB; tracked tree %.1f MB; .whl/ bitsandbytes %.1f MB; total %.1f MiB of 64 MiB\n",
         d, f / 1e6, t / 1e6, b / 1e6, s / 1048576 }'
[ "$total" -le "$limit" ] || { echo "over the device tool's 64 MiB: carry less"; exit 1; }
