#!/usr/bin/env bash
# VNN-COMP tool interface: install_tool.sh v1
# Builds the repository's virtual environment (.venv, via `make venv`: torch, auto_LiRPA 0.3,
# onnxruntime, ...) and checks that the `rj` command runs.  Idempotent: an up-to-date .venv is
# left alone.
set -euo pipefail

if [[ $# -ne 1 || "$1" != "v1" ]]; then
    echo "usage: install_tool.sh v1 (got: $*)" >&2
    exit 1
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
make venv
"$REPO/.venv/bin/rj" --help >/dev/null
echo "rj_plugin verifier installed: $REPO/.venv/bin/rj"
