"""Two probes: (1) do host->device copies on two streams at once move fewer bytes per second than
on one? (2) decode per call when the graph's fetches wait for the previous call's refill (copies
serialized, as the profiled timeline shows them), and timed inside / outside the profiler."""
import json, os, statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bench_offload as b
from fx_offload import runtime

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
# (1) concurrent copies
n, size = 16, 8 << 20
hosts = [torch.empty(size, dtype=torch.uint8).pin_memory() for _ in range(n)]
devs = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(n)]
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def run(split):
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cur = torch.cuda.current_stream()
    st.record(cur)
    s1.wait_stream(cur); s2.wait_stream(cur)
    for i in range(n):
        s = s2 if (split and i % 2) else s1
        with torch.cuda.stream(s):
            devs[i].copy_(hosts[i], non_blocking=True)
    cur.wait_stream(s1); cur.wait_stream(s2)
    en.record(cur); en.synchronize()
    return n * size / st.elapsed_time(en) / 1e6
for _ in range(3): run(False); run(True)
out["one_stream_gbs"] = statistics.median([run(False) for _ in range(10)])
out["two_streams_gbs"] = statistics.median([run(True) for _ in range(10)])
print(out, flush=True)
del hosts, devs

device, dtype = torch.device("cuda"), torch.bfloat16
case = b.CASES["decode_T8"]
torch.manual_seed(0)
with torch.device(device):
    state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
original = runtime._start_copies

def serialized(buffers, weights):
    if buffers and buffers[0].device.type == "cuda" and runtime._running:
        copy = runtime._copy_stream(buffers[0].device)
        for found in runtime._graph_heads.get(runtime._running[-1], ()):
            if found.refilled is not None:
                copy.wait_event(found.refilled)
    original(buffers, weights)

def timed(fn, n=60):
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(x); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 3)

out["rows"] = []
for rnd in range(2):
    for cfg in [(2, 1), (4, 3)]:
        for serial in (False, True):
            torch._dynamo.reset()
            b.FX_OPTIONS.clear(); b.FX_OPTIONS.update(prefetch=cfg[0], prefetch_head=cfg[1])
            runtime._start_copies = serialized if serial else original
            try:
                fn = b.prepare("fx_offload reduce-overhead", case, state, device, dtype)
                with torch.no_grad():
                    for _ in range(20): fn(x)
                    row = {"cfg": cfg, "serial": serial, "round": rnd, "per_call": timed(fn), "b2b": round(b.time_back_to_back(fn, x, calls=50), 3)}
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
                        row["per_call_profiled"] = timed(fn, 20)
                    row["per_call_after"] = timed(fn)
            finally:
                runtime._start_copies = original
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            del fn
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "serial.json"), "w"), indent=1)
