"""Does a device-to-device memcpy node in a CUDA graph wait for a host-to-device copy running on
another stream? (addmm's copy of its input, in the graph's tail, behind the refill.)"""
import json, os, statistics, time
import torch

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
big = 64 << 20
host = torch.empty(big, dtype=torch.uint8).pin_memory()
dev = torch.empty(big, dtype=torch.uint8, device="cuda")
src = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
bufs = [torch.empty_like(src) for _ in range(9)]
w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
side = torch.cuda.Stream()

small_host = torch.randn(8, 1024, dtype=torch.bfloat16).pin_memory()
small_dev = torch.empty(8, 1024, device="cuda", dtype=torch.bfloat16)
side2 = torch.cuda.Stream()

def body(kind):
    if kind.startswith("h2d_"):  # like our graphs: an H2D copy on a forked stream, joined
        kind = kind[4:]
        side2.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side2):
            small_dev.copy_(small_host, non_blocking=True)
        torch.cuda.current_stream().wait_stream(side2)
    x = src
    for i in range(8):
        y = x @ w
        if kind == "memcpy":
            bufs[i].copy_(y)  # contiguous, same dtype: cudaMemcpyAsync D2D
        elif kind == "addmm":
            torch.addmm(x, x, w, out=bufs[i])  # copies x into out, then gemm with beta=1
        else:
            torch.add(y, 0, out=bufs[i])  # a kernel
        x = bufs[i]
    return x

graphs = {}
for kind in ("kernel", "memcpy", "addmm", "h2d_kernel", "h2d_memcpy", "h2d_addmm"):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body(kind)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body(kind)
    graphs[kind] = g

def replay(kind, h2d):
    torch.cuda.synchronize()
    if h2d:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dev.copy_(host, non_blocking=True)
        torch.cuda._sleep(200000)  # let the copy start before the graph
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record(); graphs[kind].replay(); s1.record()
    torch.cuda.synchronize()
    return s0.elapsed_time(s1) * 1e3

rows = []
for kind in graphs:
    for h2d in (False, True):
        for _ in range(3):
            replay(kind, h2d)
        us = statistics.median([replay(kind, h2d) for _ in range(15)])
        row = {"graph": kind, "during_h2d": h2d, "replay_us": round(us, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
out["rows"] = rows
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "graph_memcpy.json"), "w"), indent=1)
raise SystemExit
# the same bodies eagerly, queued behind an event so the stream is full when the copy starts
for kind in ("kernel", "memcpy"):
    for h2d in (False, True):
        ts = []
        for _ in range(10):
            torch.cuda.synchronize()
            if h2d:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    dev.copy_(host, non_blocking=True)
            torch.cuda._sleep(200000)
            s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s0.record(); body(kind); s1.record()
            torch.cuda.synchronize()
            ts.append(s0.elapsed_time(s1) * 1e3)
        row = {"eager": kind, "during_h2d": h2d, "us": round(statistics.median(ts), 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
out["rows"] = rows
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "graph_memcpy.json"), "w"), indent=1)
