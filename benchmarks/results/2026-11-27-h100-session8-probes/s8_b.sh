#!/usr/bin/env bash
# Session 8, second device command: refill_in_graph 0 / 6 MiB / whole heads, four cases, 2 rounds in-process.
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/sweep
merge() { python - <<'PY'
import glob, json, os
runs = {os.path.basename(p): json.load(open(p)) for p in sorted(glob.glob("/tmp/sweep/*.json"))}
json.dump(runs, open(os.path.join(os.environ["OUT"], "sweep.json"), "w"), indent=1)
PY
}
for c in ${CASES:-decode_T8 quarter_T4096 all_T256 all_T8192}; do
  for b in 0 6291456 1099511627776; do
    echo "== $c refill_in_graph $b $(date -u +%T)"
    timeout 100 python benchmarks/bench_offload.py --case $c --in-process --rounds 2 --refill-in-graph $b \
      --method "resident compiled" --method "fx_offload reduce-overhead" \
      --json /tmp/sweep/$c-$b.json 2>&1 | grep -E "^fx_offload reduce|^resident|floor"
    merge
  done
done
