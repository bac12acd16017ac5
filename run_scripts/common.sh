# Sourced by quickstart.sh and quickstart_segmentation.sh (not run directly): the malloc
# settings, the progress line, and the virtual environment .venv (Paddle CPU + requirements.txt)
# unless PYTHON names an interpreter to use as it is.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# glibc's malloc thresholds (runtime.py): exported here so that the entry points need no restart
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
start=$SECONDS
elapsed() { echo "$(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"; }
step() { echo; echo "== [$(elapsed)] $*"; }
fresh_runs() { # folder run... : a rerun of a quickstart starts these runs afresh
  local out=$1 run; shift
  for run in "$@"; do
    if [[ -d $out/$run ]]; then echo "(replacing the earlier run $out/$run)"; rm -rf -- "${out:?}/$run"; fi
  done
}
if [[ -z ${PYTHON:-} ]]; then
  step "virtual environment .venv (Paddle CPU + requirements.txt)"
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check paddlepaddle -r requirements.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  PYTHON=.venv/bin/python
fi
