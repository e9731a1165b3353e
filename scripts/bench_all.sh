#!/usr/bin/env bash
# Regenerate every benchmark record that README.md and deploy/PRIVACY.md quote (docs/bench/*.json),
# then print the line each document must quote (a test checks that they do).
#
# Run it on an idle machine: every benchmark records the load average at its start and end and
# warns on stderr when the load leaves fewer free cores than its threads. On a 2-core machine
# it takes about 20 minutes. Usage:
#   scripts/bench_all.sh                        # uses `promptsam` on PATH
#   PROMPTSAM=.venv/bin/promptsam scripts/bench_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTSAM=${PROMPTSAM:-promptsam}
PYTHON=${PYTHON:-$(dirname "$(command -v "$PROMPTSAM")")/python}
export OMP_NUM_THREADS=1   # --threads sets torch's threads per benchmark; this keeps other pools at 1

run() {
    echo "+ promptsam $*" >&2
    "$PROMPTSAM" "$@" >/dev/null
}

# Attention implementations on CPU (the measurement behind sam.attention: auto).
run bench attention --preset tiny --device cpu --image-size 128 256 512 --batch 8 4 2 --warmup 1 --steps 7 \
    --threads 1 --out docs/bench/attention_cpu.json
# Training step: plain SAMed recipe vs this project's SAM path vs the full pipeline.
run bench step --preset tiny --image-size 128 --batch 8 --device cpu --warmup 2 --steps 9 --threads 1 \
    --out docs/bench/step_tiny.json
run bench step --preset tiny --image-size 256 --batch 4 --device cpu --warmup 2 --steps 9 --threads 1 \
    --out docs/bench/step_tiny_256.json
run bench step --preset tiny --image-size 512 --batch 2 --device cpu --warmup 1 --steps 7 --threads 1 \
    --out docs/bench/step_tiny_512.json
# DP-SGD step vs the non-DP step (README: 1 thread; deploy/PRIVACY.md: 2 threads, batch 8 and 16).
run bench dp --preset tiny --batch 8 --device cpu --warmup 2 --steps 7 --threads 1 --out docs/bench/dp_tiny.json
run bench dp --preset tiny --batch 8 --device cpu --warmup 2 --steps 7 --threads 2 \
    --out docs/bench/dp_tiny_threads2.json
run bench dp --preset tiny --batch 16 --device cpu --warmup 1 --steps 5 --threads 2 \
    --out docs/bench/dp_tiny_b16_threads2.json
# Activation memory (bytes autograd keeps; not timed, the load does not matter), base preset at 1024 px.
# Needs about 16 GiB of free RAM (the process peaks near 16 GiB).
run bench memory --preset base --image-size 1024 --batch 1 --dtype float32 --out docs/bench/memory_base_fp32.json
run bench memory --preset base --image-size 1024 --batch 1 --dtype bfloat16 --out docs/bench/memory_base_bf16.json
# Server aggregation: validate + aggregate 10 / 100 / 1,000 base-preset updates per strategy against one
# pass over the same bytes (interleaved, paired per repeat), peak memory, and an in-process round's overhead.
run bench round --repeats 7 --warmup 1 --out docs/bench/round_base.json
# 100 simulated hospitals (Flower + Ray, tiny preset): round time against 10 / 20 / 50 sampled per round,
# peak memory of the run and per client actor, and the README's figure (about 6 minutes on 2 cores).
run bench scale --sampled 10 20 50 --rounds 4 --out docs/bench/scale_tiny.json --figure docs/bench/scale_tiny.png

"$PYTHON" -m shared_model.benchmarks.record docs/bench/*.json
