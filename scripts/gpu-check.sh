#!/usr/bin/env bash
# The GPU figures issues 12 and 13 ask for, in one run of a few minutes: `gpt1 bench train`,
# `generate` and `serve` at their GPU sizes (the 257M reference model in bf16, the recipe's
# micro-batch, eager and compiled), each against its reference in the same run. Tables go to
# stdout, JSON and logs under $OUT (default ./gpu-check).
#
#   bash scripts/gpu-check.sh                      # on a CUDA machine, from the repo root
#   QUICK=1 BENCHES="train serve" bash scripts/gpu-check.sh   # a dry run anywhere (small presets)
#
# Runs from the source tree (PYTHONPATH=src), so nothing needs installing where gpt1's
# dependencies are present. A machine without pydantic, FastAPI or uvicorn (the lent GPU
# machines) gets them from wheels in .whl/: `bash scripts/fetch-device-wheels.sh` fetches them.
# Each benchmark is cut at its own limit (train 300 s, generate 120 s, serve 150 s: 570 s in all,
# inside one 600-second device call; LIMIT_S sets one limit for all) so that one slow
# benchmark cannot eat the others' time.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu-check: could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPT1_QUIET=1
python3 - <<'PY' | tee "$OUT/device.txt"
import datetime, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU sizes)"
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {name}")
PY
declare -A limit=([train]=300 [generate]=120 [serve]=150)
status=0
for name in ${BENCHES:-train generate serve}; do
  seconds=${LIMIT_S:-${limit[$name]:-300}}
  echo "== gpt1 bench $name (at most $seconds s)" >&2
  timeout "$seconds" python3 -m gpt1 bench "$name" ${QUICK:+--quick} --json "$OUT/$name.json" 2>&1 \
    | tee "$OUT/$name.log" || { status=1; echo "gpu-check: bench $name failed or ran past $seconds s" >&2; }
done
exit $status
