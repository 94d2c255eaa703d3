"""Does splitting 134 MB of pinned H2D into 16 or 8 copies cost time, eager and in a CUDA graph,
with and without a cross-stream event wait before each copy (as fx_offload's fetch does)?"""
import json, os, statistics
import torch
dev = torch.device("cuda")
total = 134217728
host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
dest = torch.empty(total, dtype=torch.uint8, device=dev)
side = torch.cuda.Stream(); other = torch.cuda.Stream()
def issue(n, waits):
    step = total // n
    cur = torch.cuda.current_stream()
    other.wait_stream(cur)
    for i in range(n):
        if waits:
            other.wait_stream(cur)
        with torch.cuda.stream(other):
            dest[i*step:(i+1)*step].copy_(host[i*step:(i+1)*step], non_blocking=True)
    cur.wait_stream(other)
def timed(run, reps=30):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(side); run(); e.record(side); e.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts)
res = {}
for n in (1, 8, 16, 32, 64):
    for waits in (False, True):
        with torch.cuda.stream(side):
            med, mn = timed(lambda: issue(n, waits))
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=side):
            issue(n, waits)
        with torch.cuda.stream(side):
            gmed, gmn = timed(g.replay)
            # 10 replays back to back
            def ten():
                for _ in range(10): g.replay()
            tmed, tmn = timed(ten, 10)
        res[f"{n}/{waits}"] = dict(eager=(med, mn), graph=(gmed, gmn), graph10=(tmed / 10, tmn / 10))
        print(f"{n:3} copies of {total/n/1e6:6.1f} MB waits={waits!s:5}: eager {med:.3f} (min {mn:.3f}, {total/mn/1e6:.1f} GB/s)  "
              f"graph {gmed:.3f} (min {gmn:.3f}, {total/gmn/1e6:.1f} GB/s)  graph x10 per replay {tmed/10:.3f} ({total/(tmed/10)/1e6:.1f} GB/s)", flush=True)
json.dump(res, open(os.environ["OUT"] + "/copy_sizes.json", "w"), indent=1)
