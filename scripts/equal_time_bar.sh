#!/usr/bin/env bash
# The equal-time bar against the plain U-Net a user would pick instead: per seed, the pipeline's pooled
# model (simulation/results/equal_time_polyp_tiny/pooled_20min.yaml, 20 minutes) and the U-Net anchor
# (../shared/tools/unet_anchor.py --minutes 20 --augment) train side by side on the same splits, one torch
# thread each, then the pipeline is scored on every centre's test split at the model's input size (as the
# anchor scores) and at the masks' own size. About 22 minutes per seed on a 2-core machine.
#
# The anchor is run from a copy with two edits: its metrics import (shared_model.metrics moved to
# shared_model.training.metrics) and a --seed flag for its initialisation and batch order.
#
# Usage: scripts/equal_time_bar.sh OUT SEED [SEED ...]     (e.g. scripts/equal_time_bar.sh runs/equal_time 0 1)
# CONFIG=FILE picks another pipeline config (e.g. pooled_20min_samed.yaml: the prompt pathway off).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 OUT SEED [SEED ...]" >&2; exit 2; }
OUT=$1; shift
PY=${PYTHON:-.venv/bin/python}
ANCHOR=../shared/tools/unet_anchor.py
CONFIG=${CONFIG:-simulation/results/equal_time_polyp_tiny/pooled_20min.yaml}
[ -f "$ANCHOR" ] || { echo "error: $ANCHOR not found (the U-Net anchor ships with ../shared)" >&2; exit 1; }
mkdir -p "$OUT"
sed -e 's/^from shared_model.metrics import/from shared_model.training.metrics import/' \
    -e 's/^    ap.add_argument("--out", default=None)$/&\n    ap.add_argument("--seed", type=int, default=0)/' \
    -e 's/torch.manual_seed(0)/torch.manual_seed(a.seed)/' -e 's/np.random.default_rng(0)/np.random.default_rng(a.seed)/' \
    "$ANCHOR" > "$OUT/unet_anchor.py"
grep -q "a.seed" "$OUT/unet_anchor.py" || { echo "error: could not add --seed to the anchor copy" >&2; exit 1; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
for seed in "$@"; do
    dir=$OUT/seed$seed; mkdir -p "$dir"
    echo "seed $seed: training both for 20 minutes (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PY" -m cli.main train --config "$CONFIG" --seed "$seed" --out "$dir/pipeline" > "$dir/pipeline.log" 2>&1 &
    pipeline=$!
    "$PY" "$OUT/unet_anchor.py" --minutes 20 --augment --seed "$seed" --out "$dir/unet.json" > "$dir/unet.log" 2>&1 &
    unet=$!
    wait $pipeline $unet
    for res in model original; do
        "$PY" -m cli.main evaluate --checkpoint "$dir/pipeline/model.pt" --split test --resolution $res \
            --out "$dir/test_$res.json" > "$dir/evaluate_$res.log" 2>&1 &
    done
    wait
    echo "seed $seed: done; $dir/unet.json, $dir/test_model.json, $dir/test_original.json"
done
