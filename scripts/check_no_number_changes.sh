#!/usr/bin/env bash
# Show that the working tree computes the same numbers as an earlier commit (default: the one
# before the layered-core refactor): the same `steerx fit` (demo model, mean_diff; tiny model,
# bipo) and the main job's `steerx eval`, run with both versions of the code in this venv, then
# compared value by value (scripts/compare_runs.py, atol 1e-6). About 20 min on 2 cores.
#   scripts/check_no_number_changes.sh [REF_COMMIT] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-77f27fb}
work=${2:-$(mktemp -d)}
./scripts/bootstrap.sh
git worktree add -f -q "$work/ref-src" "$ref"
trap 'git worktree remove --force "$work/ref-src"' EXIT
run() {  # run SRC OUT: the three jobs with the code in SRC
  local src=$1 out=$2
  mkdir -p "$out"
  for args in "fit --data synthetic --users 4 --out $out/fit" \
              "fit --tiny --data synthetic --users 3 --backbone bipo --out $out/fit_bipo" \
              "eval --data health_tweets --users 6 --out $out/demo"; do
    PYTHONPATH="$src" HF_HUB_OFFLINE=1 .venv/bin/python -c \
      "from steerx_lens.cli import main; main()" $args > "$out/$(echo "$args" | cut -d' ' -f1-3 | tr ' ' _).log" 2>&1
  done
}
[ -f "$work/ref/demo/metrics.json" ] || run "$work/ref-src/src" "$work/ref"
run "$PWD/src" "$work/new"
.venv/bin/python scripts/compare_runs.py "$work/ref" "$work/new"
