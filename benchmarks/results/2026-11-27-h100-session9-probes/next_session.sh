#!/usr/bin/env bash
# Next session, first device command (carry [".whl", "scratch"]): the full table with the final
# default (refill_in_graph 'auto', estimated), peers included, then tests/gpu. ~9-10 min: split
# in two commands if the budget allows (bench first: it decides whether #3 closes).
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 420 python benchmarks/bench_offload.py --rounds 3 --json $OUT/bench.json > $OUT/bench.txt 2>&1
grep -vE "^\s*$|Warning|warn" $OUT/bench.txt | cut -c1-170
# Second command:
#   source benchmarks/device_setup.sh; timeout 300 python -m pytest -q -rs tests/gpu > $OUT/tests_gpu.txt 2>&1; tail -5 $OUT/tests_gpu.txt
