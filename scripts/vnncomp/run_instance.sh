#!/usr/bin/env bash
# VNN-COMP tool interface: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Runs `rj verify` (the repository's .venv) with configs/vnncomp/CATEGORY.yaml when it exists.
# RESULTS_FILE gets sat (+ witness) | unsat | unknown | timeout | error.
#
# Time: rj verify gets TIMEOUT - MARGIN seconds (its own watchdog writes `timeout` then); if it
# is still running at TIMEOUT - MARGIN/2, coreutils `timeout` stops it (SIGTERM, SIGKILL one
# second later) and this script writes `timeout`.  MARGIN is 2 s, or 15% of TIMEOUT when that is
# smaller.  A run that ends without writing RESULTS_FILE (bad input: rj prints `rj: error: ...`)
# gets `error`.  Exit status 0 whenever RESULTS_FILE was written.
set -uo pipefail

if [[ $# -ne 6 || "$1" != "v1" ]]; then
    echo "usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT (got: $*)" >&2
    exit 1
fi
CATEGORY="$2"
ONNX="$3"
VNNLIB="$4"
RESULTS="$5"
TIMEOUT="$6"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RJ="$REPO/.venv/bin/rj"

if ! awk -v t="$TIMEOUT" 'BEGIN { exit !(t + 0 > 0 && t == t + 0) }'; then
    echo "run_instance.sh: TIMEOUT must be a number > 0, got '$TIMEOUT'" >&2
    exit 1
fi
read -r INNER OUTER < <(awk -v t="$TIMEOUT" \
    'BEGIN { m = (0.15 * t < 2) ? 0.15 * t : 2; printf "%.3f %.3f\n", t - m, t - m / 2 }')

write_result() {  # atomic: a temporary file in the same folder, then mv
    local tmp
    tmp="$(mktemp "$(dirname "$RESULTS")/.$(basename "$RESULTS").XXXXXX")" || exit 1
    printf '%s\n' "$1" > "$tmp" && chmod "$(printf '%o' $((0666 & ~$(umask))))" "$tmp" && mv -f "$tmp" "$RESULTS"
}

ARGS=(verify --model "$ONNX" --vnnlib "$VNNLIB" --timeout "$INNER" --results "$RESULTS"
      --category "$CATEGORY")
CONFIG="$REPO/configs/vnncomp/$CATEGORY.yaml"
if [[ -f "$CONFIG" ]]; then
    ARGS+=(--config "$CONFIG")
fi

rm -f "$RESULTS"
timeout --kill-after=1 "$OUTER" "$RJ" "${ARGS[@]}"
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "run_instance.sh: $CATEGORY: stopped after ${OUTER}s" >&2
    write_result timeout
elif [[ ! -s "$RESULTS" ]]; then
    echo "run_instance.sh: $CATEGORY: rj verify exited with status $rc without a result" >&2
    write_result error
fi
exit 0
