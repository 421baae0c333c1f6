#!/usr/bin/env bash
# The training runs behind docs/EXTRACT.md's comparison table (issue 16): two models (small,
# mnist) on two data sets (the embedded digits at 8x8, the generated noisy shapes at 12x12,
# scripts/make_shapes.py), learning rate 1e-3, runs of 100, 150, 300 and 1000 epochs, then
# `analyzer reaction` over the training and test images of every checkpoint.
#
#   scripts/extract_runs.sh ROOT [DATASET...]      DATASET: digits, shapes (default: both)
#
# One thread per process (OMP_NUM_THREADS=1); the data sets run one after the other, or in
# parallel when started as two calls. Finished runs are skipped, so a rerun continues.
# Then: .venv/bin/python scripts/extract_table.py ROOT
set -euo pipefail
root=$(realpath -m "${1:?usage: extract_runs.sh ROOT [digits|shapes]...}")  # the run files store the data path
shift
datasets=("${@:-digits shapes}")
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/.venv/bin
export OMP_NUM_THREADS=1
mkdir -p "$root"
[ -d "$root/data/shapes" ] || "$bin/python" "$here/scripts/make_shapes.py" "$root/data/shapes"
for dataset in ${datasets[@]}; do
  if [ "$dataset" = digits ]; then
    data=(--image-size 8x8)
  else
    data=(--data "$root/data/shapes/train" --test "$root/data/shapes/test" --image-size 12x12)
  fi
  for model in small mnist; do
    for epochs in 100 150 300 1000; do
      run=$root/$dataset-$model-$epochs
      if [ ! -f "$run/reaction.done" ]; then
        if [ ! -f "$run/train.done" ]; then
          "$bin/trainer" run --out "$run" --model "$model" "${data[@]}" --lr 1e-3 \
              --epochs "$epochs" --force -q
          touch "$run/train.done"
        fi
        "$bin/analyzer" reaction --ckpt-dir "$run/checkpoints" --splits train,test -q
        touch "$run/reaction.done"
      fi
      echo "$(date -u +%H:%M:%S) $run done"
    done
  done
done
