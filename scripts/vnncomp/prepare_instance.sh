#!/usr/bin/env bash
# VNN-COMP tool interface: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Nothing to precompute: `rj verify` loads the model inside run_instance.sh's time budget.  This
# checks the arguments and that both files exist (exit 1 with a message on stderr otherwise).
set -euo pipefail

if [[ $# -ne 4 || "$1" != "v1" ]]; then
    echo "usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB (got: $*)" >&2
    exit 1
fi
CATEGORY="$2"
ONNX="$3"
VNNLIB="$4"
for f in "$ONNX" "$VNNLIB"; do
    if [[ ! -f "$f" ]]; then
        echo "prepare_instance.sh: $CATEGORY: file not found: $f" >&2
        exit 1
    fi
done
exit 0
