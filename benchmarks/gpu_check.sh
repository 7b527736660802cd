#!/usr/bin/env bash
# Checks a CUDA machine in one command, from the repository root of a checkout (docs/gpu_check.md):
#
#     bash benchmarks/gpu_check.sh                 # = python3 benchmarks/gpu_check.py --device cuda --out "$OUT"
#     bash benchmarks/gpu_check.sh --device cpu --small      # any gpu_check.py options are passed on
#
# On a machine where only torch is installed it first installs, with nothing fetched from the network, the
# wheels placed in .whl/ (see docs/gpu_check.md for the command that downloads them) and the project
# from the working tree, both into $SITE (default /tmp/site, put on PYTHONPATH); where pyro_ddpm and
# its dependencies already import, it installs nothing. Then it runs the check under `timeout`, writing
# $OUT/gpu_check.log beside the check's own files. Exit code 0: every check passed; 1: a failure, named
# on the last line as `gpu_check: FAILED <what>: <why>`.
#
# Environment: OUT (default runs/gpu_check), PYTHON (default python3), SITE (default /tmp/site),
# GPU_CHECK_TIMEOUT (seconds, default 480).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
LIMIT="${GPU_CHECK_TIMEOUT:-480}"
mkdir -p "$OUT"

fail() { echo "gpu_check: FAILED $1"; exit 1; }

if ! "$PY" -c "import pyro, arviz, h5netcdf, mlxtend, pyro_ddpm.models" >/dev/null 2>&1; then
    if ! "$PY" -c "import pyro, arviz, h5netcdf, mlxtend" >/dev/null 2>&1; then
        ls .whl/*.whl >/dev/null 2>&1 \
            || fail "install: pyro-ppl, arviz, h5netcdf or mlxtend does not import and .whl/ holds no wheels (docs/gpu_check.md says how to prepare them)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || fail "install: pip could not install the wheels of .whl/ into $SITE"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import pyro_ddpm.models" >/dev/null 2>&1; then
        if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .; then
            # no usable setuptools there: lay the packages out as pyproject.toml maps them
            echo "gpu_check.sh: pip could not build the project; copying pyro_ddpm, models and guides into $SITE"
            mkdir -p "$SITE" && rm -rf "$SITE/pyro_ddpm" && cp -r pyro_ddpm "$SITE/pyro_ddpm" \
                && cp -r models "$SITE/pyro_ddpm/models" && cp -r guides "$SITE/pyro_ddpm/guides" \
                || fail "install: could not copy the project into $SITE"
        fi
    fi
    "$PY" -c "import pyro, arviz, h5netcdf, mlxtend, pyro_ddpm.models" \
        || fail "install: the installed packages do not import (the traceback above says which)"
fi

echo "gpu_check.sh: $("$PY" -c 'import sys, torch, pyro, pyro_ddpm; print(sys.executable, "torch", torch.__version__, "pyro", pyro.__version__, "pyro_ddpm from", pyro_ddpm.__file__)')"
PYTHONUNBUFFERED=1 timeout --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_check.py --device cuda --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    fail "timeout: benchmarks/gpu_check.py ran past $LIMIT s (what it finished is in $OUT/gpu_check.md)"
fi
[ "$rc" -eq 0 ] || exit 1
