#!/usr/bin/env bash
# Session 8, first device command: tests/gpu on HEAD, then the quarter puzzle and decode profiles.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
date -u +%T
timeout 260 python -m pytest -q -rs tests/gpu > $OUT/tests_gpu.txt 2>&1; echo "pytest rc=$?" >> $OUT/tests_gpu.txt
tail -5 $OUT/tests_gpu.txt
date -u +%T
timeout 150 python benchmarks/profile_case.py --case quarter_T4096 --refill-timing --calls 2 --json $OUT/profile-quarter.json > $OUT/profile-quarter.txt 2>&1
grep -E "reduce-overhead|floor" $OUT/profile-quarter.txt | cut -c1-600
date -u +%T
timeout 150 python benchmarks/profile_case.py --case decode_T8 --refill-timing --calls 2 --refill-in-graph 0 --refill-in-graph 6291456 --json $OUT/profile-decode.json > $OUT/profile-decode.txt 2>&1
grep -E "reduce-overhead|floor" $OUT/profile-decode.txt | cut -c1-600
date -u +%T
