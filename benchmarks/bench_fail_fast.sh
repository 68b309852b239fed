#!/usr/bin/env bash
# Time trivial refusals of pipelines/*.py on an older commit and on this checkout, one run, same
# machine (docs/BENCHMARKS.md section 9):
#   git worktree add /tmp/oldtree 5a78ac9 && bash benchmarks/bench_fail_fast.sh /tmp/oldtree
# Workers must import the old tree's ssd too: PYTHONPATH is set per tree.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
OLD="${1:?usage: bench_fail_fast.sh OLD_TREE}"
export SSD_LOCAL_STATE=/tmp/ff-no-services RAY_ADDRESS= SSD_MLFLOW_HOME=/tmp/ff-mlflow
mkdir -p /tmp/ff-no-services; echo '{}' > /tmp/ff-gt.json
for tree in "$OLD" "$ROOT"; do
  for case in "train.py --data /nope --no-mlflow" "train.py --workers 64 --no-mlflow" "evaluate.py --coco-gt /tmp/ff-gt.json --detections /nope.json" "train.py --no-mlflow optim.lr=abc"; do
    s=$(date +%s.%N); (cd /tmp && PYTHONPATH=$tree timeout 300 $PY $tree/pipelines/$case > /tmp/ff.out 2>&1); rc=$?; e=$(date +%s.%N)
    printf '%s | %s | %.1f s | exit %s | %s\n' "$(basename $tree)" "$case" "$(echo "$e - $s" | bc)" "$rc" "$(tail -c 150 /tmp/ff.out | tr '\n' ' ')"
  done
done
