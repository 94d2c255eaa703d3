"""Does the caller's stream (the legacy default stream or a stream of its own) change whether a
decode call ends when the refill issued after it ends?"""
import json, os, statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bench_offload as b
import profile_case as pc

device, dtype = torch.device("cuda"), torch.bfloat16
case = b.CASES["decode_T8"]
torch.manual_seed(0)
with torch.device(device):
    state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
user = torch.cuda.Stream()
for rnd in range(2):
    for cfg in [(2, 1), (4, 3)]:
        for where in ("default", "user"):
            torch._dynamo.reset()
            b.FX_OPTIONS.clear(); b.FX_OPTIONS.update(prefetch=cfg[0], prefetch_head=cfg[1])
            stream = torch.cuda.default_stream() if where == "default" else user
            with torch.no_grad(), torch.cuda.stream(stream):
                fn = b.prepare("fx_offload reduce-overhead", case, state, device, dtype)
                for _ in range(20):
                    fn(x)
                torch.cuda.synchronize()
                row = {"cfg": cfg, "stream": where, "round": rnd}
                for gap in (0.0, 1.0):
                    row[f"gap{gap}"] = {k: round(v, 3) for k, v in pc.refill_timing(fn, x, n=60, gap_ms=gap).items()}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            del fn
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "stream_probe.json"), "w"), indent=1)
