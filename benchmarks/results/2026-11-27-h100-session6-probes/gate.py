"""Does a decode call's end wait for the refill the wrapper issues after it?"""
import json, os, statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bench_offload as b
from fx_offload import runtime

device, dtype = torch.device("cuda"), torch.bfloat16
case = b.CASES["decode_T8"]
torch.manual_seed(0)
with torch.device(device):
    state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
original = runtime._refill_after
SLEEP = int(os.environ.get("SLEEP_CYCLES", "2000000"))

def delayed(found):
    copy = runtime._copy_stream(found.buffers[0].device)
    with torch.cuda.stream(copy):
        torch.cuda._sleep(SLEEP)
    original(found)

def timed(fn, gap=0.0, n=60, where=None):
    ts, host = [], []
    for _ in range(n):
        if gap:
            time.sleep(gap / 1e3)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record(); fn(x)
        e.record(where) if where is not None else e.record()
        e.synchronize()
        host.append((time.perf_counter() - t0) * 1e3)
        ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 3), round(statistics.median(host), 3)

# how long the sleep takes alone
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); torch.cuda._sleep(SLEEP); e.record(); e.synchronize()
report["sleep_ms"] = s.elapsed_time(e)
print("sleep ms", report["sleep_ms"], flush=True)
for rnd in range(2):
    for cfg in [(2, 1), (4, 3)]:
        torch._dynamo.reset()
        b.FX_OPTIONS.clear()
        b.FX_OPTIONS.update(prefetch=cfg[0], prefetch_head=cfg[1])
        fn = b.prepare("fx_offload reduce-overhead", case, state, device, dtype)
        row = {"cfg": cfg, "round": rnd}
        with torch.no_grad():
            for _ in range(20):
                fn(x)
            torch.cuda.synchronize()
            fn(x)
            row["stream_after_call"] = str(torch.cuda.current_stream())
            row["default_stream"] = str(torch.cuda.default_stream())
            torch.cuda.synchronize()
            for gap in (0.0, 1.0):
                row[f"gap{gap}"] = timed(fn, gap)
                row[f"gap{gap}_end_on_default"] = timed(fn, gap, where=torch.cuda.default_stream())
                runtime._refill_after = delayed
                try:
                    row[f"gap{gap}_refill_delayed"] = timed(fn, gap)
                finally:
                    runtime._refill_after = original
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        del fn
json.dump(report, open(os.path.join(os.environ.get("OUT", "."), "gate.json"), "w"), indent=1)
