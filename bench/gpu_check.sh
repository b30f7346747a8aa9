#!/usr/bin/env bash
# The prepared GPU run, one call on the GPU machine (bench/gpu_check.py says what it does):
#   bash bench/gpu_check.sh [--deadline SECONDS] [--out DIR] [--dry-run]
#   bash bench/gpu_check.sh prepare | unpack ARCHIVE
# PYTHON picks the interpreter (default python3, the GPU machine's). Paths are taken from where it is called.
set -uo pipefail
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" > /dev/null; then
    echo "gpu_check: no $PYTHON on PATH; set PYTHON to the interpreter that has torch and triton" >&2
    exit 2
fi
exec "$PYTHON" "$(dirname "$0")/gpu_check.py" "$@"
