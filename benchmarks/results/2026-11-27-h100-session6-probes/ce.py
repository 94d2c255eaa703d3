"""Do device-to-device memcpys (cudagraph trees' input copies, addmm's copy of its input) queue
behind a large host-to-device copy on another stream? And what do chunked H2D copies cost?"""
import json, os, statistics, time
import torch

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
big = 64 << 20
host = torch.empty(big, dtype=torch.uint8).pin_memory()
dev = torch.empty(big, dtype=torch.uint8, device="cuda")
small_src = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
small_dst = torch.empty_like(small_src)
mid_src = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
mid_dst = torch.empty_like(mid_src)
small_host = torch.randn(8, 1024, dtype=torch.bfloat16).pin_memory()
a, bstream = torch.cuda.Stream(), torch.cuda.Stream()

def h2d(chunk):
    with torch.cuda.stream(a):
        if chunk is None:
            dev.copy_(host, non_blocking=True)
        else:
            for i in range(0, big, chunk):
                dev[i:i + chunk].copy_(host[i:i + chunk], non_blocking=True)

ops = {
    "d2d_memcpy_16KiB": lambda: small_dst.copy_(small_src),
    "d2d_memcpy_4MiB": lambda: mid_dst.copy_(mid_src),
    "kernel_add_16KiB": lambda: torch.add(small_src, 1, out=small_dst),
    "h2d_16KiB": lambda: small_dst.copy_(small_host, non_blocking=True),
}

def probe(op, chunk, with_big=True):
    torch.cuda.synchronize()
    s0 = torch.cuda.Event(enable_timing=True); s1 = torch.cuda.Event(enable_timing=True)
    b0 = torch.cuda.Event(enable_timing=True); b1 = torch.cuda.Event(enable_timing=True)
    b0.record(a)
    if with_big:
        h2d(chunk)
    b1.record(a)
    time.sleep(0.0002)  # the big copy is running
    s0.record(bstream)
    with torch.cuda.stream(bstream):
        ops[op]()
    s1.record(bstream)
    torch.cuda.synchronize()
    return s0.elapsed_time(s1) * 1e3, b0.elapsed_time(b1) * 1e3

for _ in range(3):
    probe("d2d_memcpy_16KiB", None)
rows = []
for chunk in (None, 8 << 20, 2 << 20, 1 << 20, 512 << 10):
    for op in ops:
        waits, bigs = zip(*[probe(op, chunk) for _ in range(7)])
        base = statistics.median([probe(op, chunk, with_big=False)[0] for _ in range(5)])
        row = {"chunk": chunk, "op": op, "op_us_alone": round(base, 1), "op_us_during_h2d": round(statistics.median(waits), 1),
               "h2d_us": round(statistics.median(bigs), 1), "h2d_gbs": round(big / statistics.median(bigs) / 1e3, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
out["rows"] = rows
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ce.json"), "w"), indent=1)
