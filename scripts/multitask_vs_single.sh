#!/usr/bin/env bash
# One model for every task against one model per task (issue 13): the tiny preset adapted from its
# committed foundation on the pooled training splits of the three polyp centres, breast ultrasound and
# retinal vessels together, and on each task alone, same steps and seeds
# (simulation/configs/multitask_tiny.yaml), two runs at a time with one torch thread each; then
# simulation/multitask_report.py writes OUT/table.md. About 25 minutes on a 2-core machine.
#
# Usage: scripts/multitask_vs_single.sh OUT [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 OUT [--set KEY=VALUE ...]" >&2; exit 2; }
OUT=$1; shift
PY=${PYTHON:-.venv/bin/python}
CONFIG=simulation/configs/multitask_tiny.yaml
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
run() {  # NAME [--set ...]
    local name=$1; shift
    "$PY" -m cli.main experiment --config "$CONFIG" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
echo "start (load average $(cut -d' ' -f1-3 /proc/loadavg))"
run all "$@" & a=$!
run busi --set 'data.centres=[busi]' "$@" & b=$!
wait $b
run retina_vessels --set 'data.centres=[retina_vessels]' "$@" & b=$!
wait $a
run polyp --set 'data.centres=[kvasir_seg, cvc_clinicdb, cvc_colondb]' "$@" & a=$!
wait $a $b
"$PY" -m simulation.multitask_report --multi "$OUT/all" --single "polyp=$OUT/polyp" --single "busi=$OUT/busi" \
    --single "retina_vessels=$OUT/retina_vessels" --out "$OUT/table.md"
