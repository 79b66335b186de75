#!/usr/bin/env bash
# Before and after on one machine in one run: the same command in BASE, an older
# checkout of this repository, then in this tree. Each side's output goes to
# $OUT/NAME.before.log and $OUT/NAME.after.log (default OUT: /tmp/ab); its JSON lines
# are printed. Relative paths in the command resolve inside each tree.
#
#   git archive <commit> | tar -x -C .base      (an ignored folder; carry it to the GPU)
#   bench/ab.sh .base w3 python3 bench/latency.py --model ... --batch-size 1 8
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: bench/ab.sh BASE NAME CMD..." >&2; exit 2; }
BASE=$(cd "$1" && pwd) || exit 2
NAME=$2
shift 2
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/ab}
mkdir -p "$OUT"
for side in before after; do
  dir=$HERE
  [ "$side" = before ] && dir=$BASE
  log=$OUT/$NAME.$side.log
  (cd "$dir" && PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} "$@") >"$log" 2>&1
  rc=$?
  echo "=== $NAME $side (exit $rc)"
  grep -E '^\{' "$log" || tail -n 15 "$log"
done
