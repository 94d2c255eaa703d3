"""Why does a decode call end only when the refill issued after it ends? Variants of the wrapper's
refill, timed by profile_case.refill_timing (no recompiles: same graphs).

Ran as scratch/bisect.py; renamed, since that name shadows the standard library module."""
import json, os, statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bench_offload as b
import profile_case as pc
from fx_offload import runtime

device, dtype = torch.device("cuda"), torch.bfloat16
case = b.CASES["decode_T8"]
torch.manual_seed(0)
with torch.device(device):
    state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
original = runtime._refill_after
fresh = torch.cuda.Stream()

def no_copies(found):  # only the events
    copy = runtime._copy_stream(found.buffers[0].device)
    copy.wait_event(found.mark)
    found.refilled.record(copy)

def no_record(found):  # the copies, not the external record
    copy = runtime._copy_stream(found.buffers[0].device)
    copy.wait_event(found.mark)
    with torch.cuda.stream(copy):
        for buffer, record in zip(found.buffers, found.records):
            buffer.copy_(record.host, non_blocking=True)

def fresh_stream(found):
    fresh.wait_event(found.mark)
    with torch.cuda.stream(fresh):
        for buffer, record in zip(found.buffers, found.records):
            buffer.copy_(record.host, non_blocking=True)
        found.refilled.record(fresh)

def no_wait(found):  # copies at once, no wait for the mark (races the graph; timing only)
    copy = runtime._copy_stream(found.buffers[0].device)
    with torch.cuda.stream(copy):
        for buffer, record in zip(found.buffers, found.records):
            buffer.copy_(record.host, non_blocking=True)
        found.refilled.record(copy)

def after_graph(found):  # the refill follows the whole graph on the compute stream, not the in-graph mark
    copy = runtime._copy_stream(found.buffers[0].device)
    copy.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(copy):
        for buffer, record in zip(found.buffers, found.records):
            buffer.copy_(record.host, non_blocking=True)
        found.refilled.record(copy)

variants = {"normal": original, "after_graph": after_graph}
keys = ["call_ms", "to_wrapper_ms", "to_refill_issue_ms", "to_return_ms", "refill_starts_after_call_start_ms", "refill_ends_after_call_end_ms"]
for cfg in [(2, 1), (4, 3), (5, 4)]:
    torch._dynamo.reset()
    b.FX_OPTIONS.clear(); b.FX_OPTIONS.update(prefetch=cfg[0], prefetch_head=cfg[1])
    with torch.no_grad():
        fn = b.prepare("fx_offload reduce-overhead", case, state, device, dtype)
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
        for rnd, GAP in [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]:
            for name, variant in variants.items():
                runtime._refill_after = variant
                try:
                    r = pc.refill_timing(fn, x, n=40, gap_ms=GAP)
                finally:
                    runtime._refill_after = original
                row = {"cfg": cfg, "variant": name, "round": rnd, "gap": GAP, **{k: round(r[k], 3) for k in keys if k in r}}
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
    del fn
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "bisect.json"), "w"), indent=1)
