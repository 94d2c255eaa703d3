"""decode_T8: CPU time to issue one call (no sync), fx_offload RO vs resident RO, and a cProfile."""
import cProfile, io, os, pstats, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_offload as b
dev = torch.device("cuda"); dtype = torch.bfloat16
case = b.CASES["decode_T8"]
torch.manual_seed(0)
with torch.device(dev):
    state = {k: v.to(dtype).cpu() for k, v in b.Stack(case).state_dict().items()}
x = torch.randn(case.tokens, case.dim, device=dev, dtype=dtype)
for method in ("resident reduce-overhead", "fx_offload reduce-overhead"):
    torch._dynamo.reset(); torch.cuda.synchronize()
    fn = b.prepare(method, case, state, dev, dtype)
    with torch.no_grad():
        for _ in range(5): fn(x)
        torch.cuda.synchronize()
        for rep in range(3):
            cpu = []
            t_all = time.perf_counter()
            s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(50):
                t0 = time.perf_counter(); fn(x); cpu.append((time.perf_counter() - t0) * 1e3)
            t_issue = (time.perf_counter() - t_all) * 1e3 / 50
            e.record(); e.synchronize()
            print(f"{method:28} issue per call: median {statistics.median(cpu):.3f} ms, mean {t_issue:.3f} ms; GPU per call {s.elapsed_time(e)/50:.3f} ms", flush=True)
        torch.cuda.synchronize()
        pr = cProfile.Profile(); pr.enable()
        for _ in range(50): fn(x)
        pr.disable(); torch.cuda.synchronize()
        out = io.StringIO(); pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
        print("\n".join(out.getvalue().splitlines()[:45]))
    del fn
