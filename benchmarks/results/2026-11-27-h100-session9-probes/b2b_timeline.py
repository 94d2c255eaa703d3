"""Back to back, where is the bus idle? all_T256 / decode_T8, fx_offload reduce-overhead:
a profiler timeline of 6 calls issued without a sync; copies merged across streams."""
import json, os, sys, tempfile
import torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, "benchmarks")
import bench_offload as b
dev = torch.device("cuda"); dtype = torch.bfloat16
out = {}
for name in sys.argv[1].split(","):
    case = b.CASES[name]
    torch.manual_seed(0)
    with torch.device(dev):
        state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
    x = torch.randn(case.tokens, case.dim, device=dev, dtype=dtype)
    torch._dynamo.reset()
    fn = b.prepare("fx_offload reduce-overhead", case, state, dev, dtype)
    with torch.no_grad():
        for _ in range(4): fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(6): fn(x)
            torch.cuda.synchronize()
    path = tempfile.mkstemp(suffix=".json")[1]
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    t0 = min(e["ts"] for e in gpu); t1 = max(e["ts"] + e["dur"] for e in gpu)
    cps = sorted((e for e in gpu if e["cat"] == "gpu_memcpy"), key=lambda e: e["ts"])
    merged = []
    for e in cps:
        s, f = e["ts"] - t0, e["ts"] + e["dur"] - t0
        if merged and s <= merged[-1][1]: merged[-1][1] = max(merged[-1][1], f)
        else: merged.append([s, f])
    gaps = [(round(a[1]), round(b_[0] - a[1], 1)) for a, b_ in zip(merged, merged[1:]) if b_[0] - a[1] > 2]
    total = sum((e["args"] or {}).get("bytes", 0) for e in cps)
    busy = sum(f - s for s, f in merged)
    launches = [round(e["ts"] - t0) for e in ev if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"]
    rows = [(round(e["ts"] - t0), round(e["dur"]), (e["args"] or {}).get("stream"), (e["args"] or {}).get("bytes")) for e in cps]
    print(f"{name}: span {t1 - t0:.0f} us for 6 calls ({(t1-t0)/6:.0f} per call), copies {len(cps)}, {total/1e9:.3f} GB, "
          f"bus busy {busy:.0f} us ({total/busy/1e3:.1f} GB/s while busy), idle gaps >2us: {len(gaps)} totalling {sum(g for _, g in gaps):.0f} us")
    print("  gaps (at us, idle us):", gaps[:40])
    print("  graph launches at:", launches)
    print("  copies (start, us, stream, bytes) first 40:", rows[:40])
    out[name] = dict(rows=rows, gaps=gaps, launches=launches, span=t1 - t0, busy=busy, bytes=total)
    del fn
json.dump(out, open(os.environ["OUT"] + "/b2b_timeline.json", "w"))
