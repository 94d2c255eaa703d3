"""Graph = [small H2D on a forked stream, joined] -> ~0.5 ms of kernels -> 8 x (mm, then a D2D
memcpy | a kernel | addmm). The host issues a 64 MiB H2D right after the launch (it starts once
the graph's own H2D is done): do the tail's memcpys wait for it?"""
import json, os, statistics, time
import torch

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
big = 64 << 20
host = torch.empty(big, dtype=torch.uint8).pin_memory()
dev = torch.empty(big, dtype=torch.uint8, device="cuda")
src = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
bufs = [torch.empty_like(src) for _ in range(9)]
w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
small_host = torch.randn(8, 1024, dtype=torch.bfloat16).pin_memory()
small_dev = torch.empty(8, 1024, device="cuda", dtype=torch.bfloat16)
fork, side = torch.cuda.Stream(), torch.cuda.Stream()

def body(kind):
    fork.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(fork):
        small_dev.copy_(small_host, non_blocking=True)
    torch.cuda.current_stream().wait_stream(fork)
    torch.cuda._sleep(1_000_000)
    x = src + small_dev
    for i in range(8):
        if kind == "memcpy":
            bufs[i].copy_(x @ w)
        elif kind == "addmm":
            torch.addmm(x, x, w, out=bufs[i])
        else:
            torch.add(x @ w, 0, out=bufs[i])
        x = bufs[i]
    return x

graphs = {}
for kind in ("kernel", "memcpy", "addmm"):
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
    s0, s1, c1 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    s0.record(); graphs[kind].replay(); s1.record()
    if h2d:
        time.sleep(0.0001)
        with torch.cuda.stream(side):
            dev.copy_(host, non_blocking=True)
            c1.record(side)
    torch.cuda.synchronize()
    return s0.elapsed_time(s1) * 1e3, (s0.elapsed_time(c1) * 1e3 if h2d else 0)

rows = []
for kind in graphs:
    for h2d in (False, True):
        for _ in range(3):
            replay(kind, h2d)
        r = [replay(kind, h2d) for _ in range(15)]
        row = {"graph": kind, "h2d_after_launch": h2d, "replay_us": round(statistics.median(a for a, _ in r), 1), "h2d_ends_us": round(statistics.median(b for _, b in r), 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
out["rows"] = rows
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "tail_probe.json"), "w"), indent=1)
