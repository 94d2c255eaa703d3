#!/usr/bin/env bash
# session 9: the full table in two commands ($1: cases, comma-separated)
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
args=(); for c in ${1//,/ }; do args+=(--case "$c"); done
timeout ${2:-540} python benchmarks/bench_offload.py --rounds 3 "${args[@]}" --json $OUT/bench.json > $OUT/bench.txt 2>&1
echo "bench rc=$?"
sed -n '/^{/,$p' $OUT/bench.txt | cut -c1-170
