#!/usr/bin/env bash
# The GPU checks and figures issues 12 and 13 ask for, in a few minutes: the tests that need a
# GPU (the engine's captured decode step against eager generation), then `gpt1 bench generate`,
# `serve` and `train` at their GPU sizes (the 257M reference model in bf16, the recipe's
# micro-batch, eager and compiled), each against its reference in the same run, then `profile`:
# torch.profiler tables of both sides' compiled training step (train-profile-*.txt). `microbatch`
# (run only when named) times gpt1's compiled step at 1x, 2x and 4x the recipe's micro-batch
# (microbatch.json); `float8` (only when named) the compiled step with FP8 matmuls against bf16
# (float8.json; torchao from .whl/). Tables go to stdout, JSON and logs under $OUT (default ./gpu-check); each
# benchmark also logs every row as soon as it is measured, so a run cut short keeps what it measured.
#
#   bash scripts/gpu-check.sh                          # on a CUDA machine, from the repo root
#   STEPS="tests generate serve" bash scripts/gpu-check.sh   # some of them (one device call each)
#   QUICK=1 STEPS="train serve" bash scripts/gpu-check.sh    # a dry run anywhere (small presets)
#
# Runs from the source tree (PYTHONPATH=src), so nothing needs installing where gpt1's
# dependencies are present. A machine without pydantic, FastAPI or uvicorn (the lent GPU
# machines) gets them from wheels in .whl/: `bash scripts/fetch-device-wheels.sh` fetches them.
# Each step is cut at its own limit (tests 240 s, generate 300 s, serve 300 s, train 400 s, profile
# microbatch and float8 300 s; LIMIT_S sets one limit for all) so that one slow step cannot eat the others' time.
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
declare -A limit=([tests]=240 [generate]=300 [serve]=300 [train]=400 [profile]=300 [microbatch]=300 [float8]=300)
status=0
for name in ${STEPS:-tests generate serve train profile}; do
  seconds=${LIMIT_S:-${limit[$name]:-300}}
  echo "== $name (at most $seconds s)" >&2
  if [ "$name" = tests ]; then
    command=(python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_process.py
             -k "cuda or bucketed or staggered or compiled")
  elif [ "$name" = microbatch ]; then  # gpt1's compiled step at the recipe's micro-batch, 2x and 4x it
    command=(python3 -X faulthandler -c "import json, sys; from gpt1.benchmarks.train import micro_batch_rows; rows = micro_batch_rows(quick=bool(sys.argv[2])); open(sys.argv[1], 'w').write(json.dumps(rows, indent=1))" "$OUT/microbatch.json" "${QUICK:-}")
  elif [ "$name" = float8 ]; then  # the compiled step with FP8 matmuls against bf16 (torchao)
    command=(python3 -X faulthandler -c "import json, sys; from gpt1.benchmarks.train import float8_rows; rows = float8_rows(quick=bool(sys.argv[2])); open(sys.argv[1], 'w').write(json.dumps(rows, indent=1))" "$OUT/float8.json" "${QUICK:-}")
  elif [ "$name" = profile ]; then  # torch.profiler tables of both sides' (compiled) training step
    command=(python3 -X faulthandler -c "import sys; from gpt1.benchmarks.train import profile_steps; profile_steps(sys.argv[1], quick=bool(sys.argv[2]))" "$OUT" "${QUICK:-}")
  else
    command=(python3 -X faulthandler -m gpt1 bench "$name" ${QUICK:+--quick} --json "$OUT/$name.json")
  fi
  # SIGABRT at the limit: faulthandler prints where every thread was (a hang shows where it hangs).
  timeout -s ABRT -k 10 "$seconds" "${command[@]}" 2>&1 | tee "$OUT/$name.log" \
    || { status=1; echo "gpu-check: $name failed or ran past $seconds s" >&2; }
done
exit $status
