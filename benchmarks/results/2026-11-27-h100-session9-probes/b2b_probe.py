"""Is the back-to-back noise fx_offload's or the bus's? Per case and method: 8 reps of
(raw 1 GiB pinned H2D copy x5, b2b 20 calls, b2b 100 calls, per call median)."""
import json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_offload as b

dev = torch.device("cuda")
host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
dest = torch.empty(1 << 30, dtype=torch.uint8, device=dev)

def bw():
    ts = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); dest.copy_(host, non_blocking=True); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return [round((1 << 30) / t / 1e6, 1) for t in ts]

out = {}
cases = sys.argv[1].split(",")
methods = sys.argv[2].split(",")
for name in cases:
    case = b.CASES[name]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
    x = torch.randn(case.tokens, case.dim, device=dev, dtype=dtype)
    nbytes = 2 * case.dim * case.hidden * 2 * len(b.offloaded_indices(case))
    for method in methods:
        torch._dynamo.reset(); torch.cuda.synchronize(); torch.cuda.empty_cache()
        fn = b.prepare(method, case, state, dev, dtype)
        with torch.no_grad():
            for _ in range(3): fn(x)
        torch.cuda.synchronize()
        reps = []
        for r in range(8):
            g = bw()
            b20 = b.time_back_to_back(fn, x, 20)
            b100 = b.time_back_to_back(fn, x, 100)
            pc, _ = b.time_forward(fn, x, 0.3)
            reps.append(dict(bw=g, b20=round(b20, 3), b100=round(b100, 3), pc=round(pc, 3)))
            floor = nbytes / (max(g) * 1e6)
            print(f"{name:14} {method:26} bw {min(g):5.1f}-{max(g):5.1f} floor {floor:6.2f}  "
                  f"b2b20 {b20:7.2f} ({b20/floor:.3f})  b2b100 {b100:7.2f} ({b100/floor:.3f})  "
                  f"pc {pc:7.2f} ({pc/floor:.3f})", flush=True)
        out[f"{name}/{method}"] = reps
        del fn
json.dump(out, open(os.environ["OUT"] + "/b2b_probe.json", "w"), indent=1)
