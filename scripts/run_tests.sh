#!/usr/bin/env bash
# scripts/run_tests.sh TREE [pytest arguments]: set up ComfyUI tree TREE (current | 2024-03) and run the suite on it.
# The suite's header and summary print the tree; tests/test_tree.py fails when it ran on another tree than asked.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
shift
LOG=$(mktemp)
bash scripts/setup_env.sh "$NAME" | tee "$LOG"
TREE=$(tail -1 "$LOG" | sed -n 's/^\[setup\] ready: .* ComfyUI //p')
rm -f "$LOG"
[ -n "$TREE" ] || { echo "[test] scripts/setup_env.sh $NAME did not name a tree" >&2; exit 1; }
case "$NAME" in
  2024-03) EXPECT="2024-03 (a28a9dc8)" ;;
  current) EXPECT=$([ -n "${COMFYUI_PATH:-}" ] && echo "" || echo "0.33.0") ;;
esac
echo "[test] ComfyUI tree '$NAME' at $TREE${EXPECT:+ (expected version $EXPECT)}"
# One torch thread per process unless the caller says otherwise: pytest, the headless ComfyUI servers it starts and
# the browser share the machine's cores, and two threads per process on a busy 2-core machine are slower than one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
START=$(date +%s)
status=0
COMFYUI_PATH="$TREE" IC_EXPECT_COMFYUI_VERSION="$EXPECT" .venv/bin/python -m pytest "$@" || status=$?
echo "[test] tree '$NAME': pytest exit $status after $(( $(date +%s) - START )) s"
exit $status
