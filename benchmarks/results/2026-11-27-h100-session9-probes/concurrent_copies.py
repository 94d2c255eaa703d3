"""Do two concurrent pinned H2D copies on two streams move bytes slower than the same bytes on one
stream? (fx_offload under reduce-overhead: the wrapper's head refill on the copy stream runs beside
the next graph's own fetches.) Back to back, 10 reps each, median and min per GB."""
import json, os, statistics
import torch
n = 1 << 30
hosts = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
dests = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def one_stream():
    with torch.cuda.stream(s1):
        dests[0].copy_(hosts[0], non_blocking=True); dests[1].copy_(hosts[1], non_blocking=True)
def two_streams():
    with torch.cuda.stream(s1):
        dests[0].copy_(hosts[0], non_blocking=True)
    with torch.cuda.stream(s2):
        dests[1].copy_(hosts[1], non_blocking=True)
def chunks(k):  # two streams, each a chain of k copies (like fetches of regions)
    def run():
        step = n // k
        for i in range(k):
            with torch.cuda.stream(s1):
                dests[0][i*step:(i+1)*step].copy_(hosts[0][i*step:(i+1)*step], non_blocking=True)
            with torch.cuda.stream(s2):
                dests[1][i*step:(i+1)*step].copy_(hosts[1][i*step:(i+1)*step], non_blocking=True)
    return run
res = {}
for rnd in range(3):
    for name, run in (("one stream", one_stream), ("two streams", two_streams), ("two streams x8 chunks", chunks(8))):
        ts = []
        for _ in range(10):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); s1.wait_stream(torch.cuda.current_stream()); s2.wait_stream(torch.cuda.current_stream())
            for _ in range(5): run()
            torch.cuda.current_stream().wait_stream(s1); torch.cuda.current_stream().wait_stream(s2)
            e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 5)
        gbs = [2 * n / t / 1e6 for t in ts]
        res.setdefault(name, []).append(gbs)
        print(f"round {rnd} {name:22}: median {statistics.median(gbs):.1f} GB/s, max {max(gbs):.1f}, min {min(gbs):.1f}", flush=True)
json.dump(res, open(os.environ["OUT"] + "/concurrent_copies.json", "w"), indent=1)
