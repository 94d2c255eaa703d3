"""Where the time of an offloaded forward goes: a GPU timeline of one case's calls.

    python benchmarks/profile_case.py --case decode_T8 [--prefetch N] [--head H] [--refill-in-graph B]
        [--calls 3] [--gap-ms 1] [--cprofile] [--trace t.json] [--json profile.json]

Builds one of ``bench_offload.py``'s cases on a GPU and, for the resident model and for fx_offload
under ``reduce-overhead`` (once per combination of the options given), prints: the per-call time
with a sync after every call (what ``bench_offload.py`` reports), the per-call time of 50 calls
issued back to back, the CPU time to issue one call, and from a torch.profiler trace of
``--calls`` calls: every host->device copy (start, length, bandwidth, stream), the gaps between
copies, the kernels' busy spans per stream and the time from the first GPU activity to the last.
``--gap-ms`` sleeps on the host before each call (a serving loop's work between steps);
``--cprofile`` prints where the CPU time of issuing a call goes. The timings are taken before the
profiler runs: a process's timings after a profile are not comparable. Writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_offload as bench  # noqa: E402


def per_call_ms(fn, x, n: int = 30, gap_ms: float = 0.0) -> float:
    times = []
    for _ in range(n):
        if gap_ms:
            time.sleep(gap_ms / 1e3)  # the host's work between two calls (sampling, scheduling)
        start, end = bench.issued_now(), torch.cuda.Event(enable_timing=True)
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def issue_ms(fn, x, n: int = 30) -> float:
    """CPU milliseconds to issue one call (the GPU is idle before each)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def python_profile(fn, x, n: int = 50) -> str:
    """cProfile of ``n`` calls (a sync after each): where the CPU time to issue a call goes."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    for _ in range(n):
        torch.cuda.synchronize()
        profiler.enable()
        fn(x)
        profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumtime").print_stats(40)
    return text.getvalue()


def timeline(fn, x, trace_path: Path | None, calls: int = 1, gap_ms: float = 0.0) -> dict:
    """The GPU timeline of ``calls`` calls timed as ``bench_offload`` times them (each waited for on
    the compute stream only, the way a caller waits for its outputs), then a device sync."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            if gap_ms:
                time.sleep(gap_ms / 1e3)
            returned = torch.cuda.Event()
            fn(x)
            returned.record()
            returned.synchronize()
        torch.cuda.synchronize()
    path = trace_path or Path(tempfile.mkstemp(suffix=".json")[1])
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    t0 = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    copies = sorted((e for e in gpu if e.get("cat") == "gpu_memcpy"), key=lambda e: e["ts"])
    kernels = [e for e in gpu if e.get("cat") != "gpu_memcpy"]
    rows = []
    for e in copies:
        nbytes = (e.get("args") or {}).get("bytes")
        rows.append(
            {
                "name": e["name"],
                "stream": (e.get("args") or {}).get("stream"),
                "start_us": e["ts"] - t0,
                "us": e["dur"],
                "bytes": nbytes,
                "gbs": nbytes / e["dur"] / 1e3 if nbytes and e["dur"] else None,
            }
        )
    gaps = [(b["start_us"] - (a["start_us"] + a["us"])) for a, b in zip(rows, rows[1:])]
    launches = [e for e in events if e.get("cat") == "cuda_runtime"]
    busy: dict = {}  # stream -> [[start, end]] of kernels, merged across gaps under 20 us
    for e in sorted(kernels, key=lambda e: e["ts"]):
        spans = busy.setdefault((e.get("args") or {}).get("stream"), [])
        start, stop = e["ts"] - t0, e["ts"] + e["dur"] - t0
        if spans and start - spans[-1][1] < 20:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    return {
        "kernel_spans_us": {str(k): v for k, v in busy.items()},
        "span_us": end - t0,
        "copies": rows,
        "copy_busy_us": sum(r["us"] for r in rows),
        "copy_gaps_us": gaps,
        "kernels": len(kernels),
        "kernel_busy_us": sum(e["dur"] for e in kernels),
        "first_copy_at_us": rows[0]["start_us"] if rows else None,
        "last_gpu_after_last_copy_us": end - (rows[-1]["start_us"] + rows[-1]["us"] + t0) if rows else None,
        "runtime_calls": sorted({e["name"] for e in launches}),
        # where the CPU launched each CUDA graph, on the GPU events' clock (the call's copies and
        # kernels cannot start before it)
        "graph_launches_us": [e["ts"] - t0 for e in launches if e["name"] == "cudaGraphLaunch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", default="decode_T8", choices=list(bench.CASES), help="default: decode_T8")
    parser.add_argument("--prefetch", type=int, action="append", help="repeatable; default: the backend's")
    parser.add_argument(
        "--head",
        action="append",
        help="prefetch_head: true, false or a count (repeatable); default: the backend's",
    )
    parser.add_argument(
        "--refill-in-graph",
        type=int,
        action="append",
        help="refill_in_graph bytes (repeatable); default: the backend's",
    )
    parser.add_argument("--trace", help="write the fx_offload call's chrome trace here")
    parser.add_argument("--json", default="profile_case.json", help="where to write the figures")
    parser.add_argument("--cprofile", action="store_true", help="print a cProfile of issuing calls")
    parser.add_argument("--calls", type=int, default=1, help="calls in the profiled timeline")
    parser.add_argument(
        "--gap-ms", type=float, default=0.0, help="host sleep before each timed and profiled call"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_case.py profiles CUDA copies and kernels: run it on a machine with a GPU")
    case = bench.CASES[args.case]
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        state = {k: v.to(dtype).cpu() for k, v in bench.Stack(case).state_dict().items()}
    x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
    block = bench.block_bytes(case, dtype)
    offloaded = block * len(bench.offloaded_indices(case))
    report = {
        "environment": bench.environment(device),
        "case": args.case,
        "offloaded_bytes": offloaded,
        "bandwidth_gbs": bench.bandwidth(device) / 1e9,
        "bandwidth_one_parameter_gbs": bench.bandwidth(device, block // 2) / 1e9,
        "bandwidth_one_block_gbs": bench.bandwidth(device, block) / 1e9,
        "runs": [],
    }
    variants = [("resident reduce-overhead", {})]
    for prefetch in args.prefetch or [None]:
        for head in args.head or [None]:
            for in_graph in args.refill_in_graph or [None]:
                options = {} if prefetch is None else {"prefetch": prefetch}
                if head is not None:
                    options["prefetch_head"] = bench.parse_head(head)
                if in_graph is not None:
                    options["refill_in_graph"] = in_graph
                variants.append(("fx_offload reduce-overhead", options))
    with torch.no_grad():
        for method, options in variants:
            torch._dynamo.reset()
            bench.FX_OPTIONS.clear()
            bench.FX_OPTIONS.update(options)
            fn = bench.prepare(method, case, state, device, dtype)
            for _ in range(5):
                fn(x)
            run = {
                "method": method,
                "options": dict(options),
                "gap_ms": args.gap_ms,
                "per_call_ms": per_call_ms(fn, x, gap_ms=args.gap_ms),
                "back_to_back_ms": bench.time_back_to_back(fn, x, calls=50),
                "issue_ms": issue_ms(fn, x),
            }
            if args.cprofile:
                print(f"== cProfile, {method} {options}\n{python_profile(fn, x)}", flush=True)
            trace = Path(args.trace) if args.trace and method.startswith("fx") else None
            run["timeline"] = timeline(fn, x, trace, args.calls, args.gap_ms)
            report["runs"].append(run)
            tl = run["timeline"]
            print(
                f"{method} {options}: per call {run['per_call_ms']:.3f} ms, back to back "
                f"{run['back_to_back_ms']:.3f} ms, issue {run['issue_ms']:.3f} ms; GPU span "
                f"{tl.get('span_us', 0) / 1e3:.3f} ms, copies busy {tl.get('copy_busy_us', 0) / 1e3:.3f} ms "
                f"({len(tl.get('copies', []))} copies), first copy at {tl.get('first_copy_at_us')} us, "
                f"kernels busy {tl.get('kernel_busy_us', 0) / 1e3:.3f} ms",
                flush=True,
            )
            for row in tl.get("copies", []):
                print(
                    f"    copy {row['start_us']:9.1f} us  {row['us']:7.1f} us  "
                    f"{row['gbs'] or 0:5.1f} GB/s  stream {row['stream']}"
                )
            print(f"    copy gaps us: {[round(g, 1) for g in tl.get('copy_gaps_us', [])]}")
            for stream, spans in tl.get("kernel_spans_us", {}).items():
                print(f"    kernels on stream {stream}: {[[round(a), round(b)] for a, b in spans]}")
            fn = None
    print(
        f"bandwidth 1 GiB {report['bandwidth_gbs']:.1f} GB/s, one parameter "
        f"{report['bandwidth_one_parameter_gbs']:.1f}, one block {report['bandwidth_one_block_gbs']:.1f}; "
        f"floor {offloaded / report['bandwidth_gbs'] / 1e6:.3f} ms"
    )
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
