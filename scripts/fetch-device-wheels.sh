#!/usr/bin/env bash
# Wheels of what the lent GPU machines lack for `scripts/gpu-check.sh` (their python3 is 3.12 and
# has torch, transformers, httpx, uvloop; not pydantic, FastAPI (and its opentelemetry-api), uvicorn
# or httptools; torchao for the float8 step), into .whl/ (git-ignored via
# .git/info/exclude). Run from the repo root on a machine that reaches PyPI; name .whl in the
# device call's carry. PYVER picks another Python version.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 typing-extensions==4.16.0 \
  uvicorn==0.54.0 httptools==0.9.0 torchao==0.18.0
ls .whl
