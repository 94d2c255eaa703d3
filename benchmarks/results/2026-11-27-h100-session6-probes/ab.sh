# A/B on one machine: the refill after the whole call (HEAD) vs from the in-graph mark (72b7c1f)
source benchmarks/device_setup.sh
for v in after mark after2 mark2; do
  case $v in mark*) cp scratch/runtime_mark.py fx_offload/runtime.py;; *) git checkout -q fx_offload/runtime.py 2>/dev/null || cp scratch/runtime_after.py fx_offload/runtime.py;; esac
  echo "== $v $(date -u +%T)"
  python benchmarks/bench_offload.py --case decode_T8 --case quarter_T4096 --case all_T256 --case all_T8192 \
    --method "resident reduce-overhead" --method "fx_offload reduce-overhead" --json $OUT/ab-$v.json 2>&1 \
    | grep -E "^(decode|quarter|all)|^fx_offload reduce|^resident reduce"
done
