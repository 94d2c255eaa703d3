#!/usr/bin/env bash
# Session 8, fourth device command: the six GPU tests the new default failed (test changes), then
# decode_T8 at refill_in_graph 0 / 6 MiB / default, one process each.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 150 python -m pytest -q tests/gpu -k "waits_for_the_refill or refill_in_graph_copies" > $OUT/tests_gpu.txt 2>&1; echo "pytest rc=$?" >> $OUT/tests_gpu.txt
grep -E "passed|failed|rc=" $OUT/tests_gpu.txt | tail -3
for b in 0 6291456 auto; do
  opt=$([ $b = auto ] || echo "--refill-in-graph $b")
  echo "== decode refill_in_graph $b $(date -u +%T)"
  timeout 75 python benchmarks/bench_offload.py --case decode_T8 --in-process --rounds 2 $opt \
    --method "resident reduce-overhead" --method "fx_offload reduce-overhead" --json $OUT/decode-$b.json 2>&1 | grep -E "^fx_offload reduce|^resident|rounds|floor"
done
