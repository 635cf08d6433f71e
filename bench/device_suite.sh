#!/usr/bin/env bash
# The GPU tests (pytest -m gpu) on a device machine, from the repo root, once per package set:
#
#   SETS=".whl" bash bench/device_suite.sh              # the image's packages + bitsandbytes
#   SETS=".whl .whl+.whl_b" bash bench/device_suite.sh  # ... then with .whl_b's wheels on top too
#
# Each set is a '+'-joined list of folders of carried wheels (device tool: carry them), installed
# into a fresh target folder. cpt_studio is reached through links in a folder of its own, so the
# repo root (whose kernels/ would hide the `kernels` package of transformers >= 5.25) never lands
# on sys.path. Logs: $OUT/gpu_suite_<n>.log. TESTS overrides the test paths.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/suite_out}
mkdir -p "$OUT" /tmp/cptpath/cpt_studio
for pkg in engine studio kernels resources; do ln -sfn "$PWD/$pkg" "/tmp/cptpath/cpt_studio/$pkg"; done
n=0
status=0
for set in ${SETS:-.whl}; do
  n=$((n + 1))
  site=/tmp/site_$n
  rm -rf "$site"
  for folder in ${set//+/ }; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$folder"/*.whl || exit 1
  done
  echo "== set $n: $set"
  PYTHONPATH="$site:/tmp/cptpath" PYTHONUNBUFFERED=1 python3 -P -c "
import importlib.metadata as md, torch
names = ['torch', 'transformers', 'peft', 'bitsandbytes', 'triton', 'kernels', 'huggingface_hub']
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return '-'
print(torch.cuda.get_device_name(), ', '.join(f'{n} {version(n)}' for n in names))"
  # shellcheck disable=SC2086
  PYTHONPATH="$site:/tmp/cptpath" PYTHONUNBUFFERED=1 python3 -P -m pytest -q -m gpu -p no:cacheprovider \
      ${TESTS:-tests/kernels tests/engine tests/e2e/test_train_resume.py} 2>&1 | tee "$OUT/gpu_suite_$n.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
