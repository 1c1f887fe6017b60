#!/usr/bin/env bash
# The README's test command. pytest exit code 5 means "no tests collected": for a CI that
# is a broken configuration, never a pass.
set -u
PY=${1:-.venv/bin/python}
shift || true
"$PY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests (exit 5); treating it as a failure" >&2
    exit 1
fi
exit "$rc"
