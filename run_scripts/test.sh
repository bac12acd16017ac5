#!/usr/bin/env bash
# The test suite, from scratch: makes a virtual environment, installs Paddle (CPU), the runtime and
# the test requirements into it, and runs pytest. Extra arguments go to pytest.
#   bash run_scripts/test.sh                        # newest paddlepaddle CPU release
#   PADDLE_VERSION=2.6.2 bash run_scripts/test.sh   # the newest release PyPI has for GPUs
#   VENV=/path/to/venv bash run_scripts/test.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
# glibc's malloc thresholds (runtime.py): exported here so that the entry points need no restart
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}

PADDLE_VERSION=${PADDLE_VERSION:-}
VENV=${VENV:-.venv-test${PADDLE_VERSION:+-$PADDLE_VERSION}}
PYTHON=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pkgs=("paddlepaddle${PADDLE_VERSION:+==$PADDLE_VERSION}")
# Paddle 2.x wheels are built against NumPy 1.x (NumPy 2 crashes them)
[[ $PADDLE_VERSION == 2.* ]] && pkgs+=("numpy<2")
echo "== installing ${pkgs[*]} + requirements.txt + requirements-test.txt into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "${pkgs[@]}" -r requirements.txt -r requirements-test.txt 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$VENV/bin/python" -c "import paddle, numpy; print('== paddle', paddle.__version__, 'numpy', numpy.__version__)" \
  2> >(grep -v -i "warn" >&2)

set +e
# a passing run deletes its temporary folders (the parity fixtures alone hold 1.5 GB of ViT-B
# weights); a failing run keeps them, for one run only, to look at
"$VENV/bin/python" -m pytest tests -q -ra \
  -o tmp_path_retention_policy=failed -o tmp_path_retention_count=1 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
