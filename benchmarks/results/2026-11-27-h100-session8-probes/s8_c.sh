#!/usr/bin/env bash
# Session 8, third device command: tests/gpu on the new default, then the four cases (resident and
# fx_offload rows, two interleaved rounds, one process per case).
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline | head -1
echo "tests $(date -u +%T)"
timeout 270 python -m pytest -q -rs tests/gpu > $OUT/tests_gpu.txt 2>&1; echo "pytest rc=$?" >> $OUT/tests_gpu.txt
grep -E "passed|failed|error|rc=" $OUT/tests_gpu.txt | tail -4
echo "bench $(date -u +%T)"
timeout 290 python benchmarks/bench_offload.py --rounds 2 --method "resident compiled" --method "resident reduce-overhead" \
  --method "fx_offload compiled" --method "fx_offload reduce-overhead" --json $OUT/bench-default.json > $OUT/bench-default.txt 2>&1
grep -vE "^\s*$|Warning|warn" $OUT/bench-default.txt | cut -c1-160
echo "end $(date -u +%T)"
