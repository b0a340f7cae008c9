#!/usr/bin/env bash
# The one command a device session runs: both GPU checks of deploy/gpu_check.py (Predictor on a
# 400-slice 512 x 512 phantom, CUDA against CPU fp32; stage-1 training throughput from the on-disk
# cache), about 3-5 minutes on an H200, one JSON document on stdout and in JSON_OUT.
#
#   deploy/gpu_checks.sh JSON_OUT [more gpu_check.py options, e.g. --cpu-only and small sizes]
#
# A bare device machine lacks the DICOM stack: when <repo>/.whl (or $WHEELS_DIR) holds the wheels
# that deploy/gpu_wheels.sh fetched, they are installed into a temporary folder first. The repository
# is used from its source tree (PYTHONPATH), nothing is installed into the machine's Python.
# PYTHON (default python3) is the interpreter. The exit code is gpu_check.py's: 0 agree and ran,
# 1 probabilities disagree or the training loss was not finite, 2 a check could not run.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: deploy/gpu_checks.sh JSON_OUT [gpu_check.py options]" >&2
    exit 2
fi
json_out="$1"
shift
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheels="${WHEELS_DIR:-.whl}"
site=""
if compgen -G "$wheels/*.whl" > /dev/null; then
    site="$(mktemp -d /tmp/pe-gpu-site.XXXXXX)"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
status=0
"$python" deploy/gpu_check.py --check all --json-out "$json_out" "$@" || status=$?
if [ -n "$site" ]; then rm -rf "$site"; fi
exit "$status"
