#!/usr/bin/env bash
# The kernels under triton 3.6, the version torch 2.11's CUDA wheels pin (the GPU images we
# target), next to CI's triton 3.9: the AOT compile gate for sm_80/sm_90 (writing
# bench/results/static/3.6.0.md) and the interpreter tests of tests/kernels.
#
#   bash scripts/triton36_check.sh            # or: make triton36
#
# Its own venv (.venv-triton36; VENV36 overrides), so CI's stays on 3.9. numpy < 2.3: triton
# 3.6's interpreter converts every runtime loop bound with int() of a 1-element 1-D array,
# which numpy >= 2.3 refuses ("only 0-dimensional arrays can be converted to Python scalars"),
# so with a newer numpy every kernel with a loop fails under the 3.6 interpreter. Compiled
# kernels never touch numpy; the GPU images are unaffected.
# Wheels come from pip's own configuration, as for `make install` (here: find-links /opt/wheels
# and the file:// indexes in pip.conf; elsewhere your index). An existing venv with triton
# 3.6.0 and numpy < 2.3 is reused: VENV36=/path/to/venv skips the build.
# Cost measured on the 2-core shared dev machine (load ~8), 2026-12-07: venv build + install
# ~3 min, compile gate ~1 min (156 rows), tests/kernels ~9 min. Timings printed at the end,
# also when the tests fail (the script then exits with pytest's status).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV36=${VENV36:-.venv-triton36}
PY="$VENV36/bin/python"
start=$(date +%s)
if [ ! -x "$PY" ] || ! "$PY" -c "import sys, numpy, triton
np = tuple(map(int, numpy.__version__.split('.')[:2]))
sys.exit(triton.__version__ != '3.6.0' or np >= (2, 3))"
then
    python3 -m venv "$VENV36"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install -q "triton==3.6.0" "numpy>=1.24,<2.3" "pillow>=9.0" "pytest>=8" \
        "pytest-benchmark>=5"
    "$PY" -m pip install -q --no-deps -e .
fi
t_install=$(( $(date +%s) - start ))
t0=$(date +%s)
env -u TRITON_INTERPRET "$PY" -m selfsup.kernels.report --check \
    --out bench/results/static/3.6.0.md --json "$VENV36/report-3.6.0.json"
t_report=$(( $(date +%s) - t0 ))
t0=$(date +%s)
rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/kernels "$@" || rc=$?
t_tests=$(( $(date +%s) - t0 ))
echo "triton36: install ${t_install} s, compile gate ${t_report} s, kernel tests ${t_tests} s" \
    "(pytest exit ${rc})"
exit "$rc"
