#!/usr/bin/env bash
# Session 8, fifth device command: the estimated refill_in_graph ('auto'), four cases, then GPU tests.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
for c in decode_T8 quarter_T4096 all_T8192 all_T256; do
  echo "== $c $(date -u +%T)"
  timeout 60 python benchmarks/bench_offload.py --case $c --in-process --rounds 2 \
    --method "resident reduce-overhead" --method "fx_offload reduce-overhead" --json $OUT/auto-$c.json 2>&1 | grep -E "^fx_offload reduce|^resident|rounds|floor|auto"
done
echo "== tests $(date -u +%T)"
timeout 75 python -m pytest -q -x tests/gpu -k "matches_resident or written_between or refill_in_graph_copies" > $OUT/tests_gpu.txt 2>&1; echo "pytest rc=$?" >> $OUT/tests_gpu.txt
grep -E "passed|failed|rc=" $OUT/tests_gpu.txt | tail -3
date -u +%T
