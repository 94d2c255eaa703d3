"""How much of a CUDA graph's launch cost comes from its second stream (decode-shaped graphs).

Captures graphs shaped like the decode case (8 regions; each: 2 host-to-device copies of 8.4 MB
on a copy stream and 30 small kernels on the compute stream) with the stream edges fx_offload
uses and with fewer, and prints for each the CPU time of ``replay()`` and the time of one call
with a sync after it. Run on a GPU: ``python benchmarks/launch_probe.py --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_offload as bench  # noqa: E402

REGIONS, KERNELS, NUMEL = 8, 30, 4 << 20  # 2 x 8.4 MB bf16 per region


def build(variant: str):
    hosts = [torch.randn(NUMEL, dtype=torch.bfloat16).pin_memory() for _ in range(2 * REGIONS)]
    bufs = [torch.empty(NUMEL, dtype=torch.bfloat16, device="cuda") for _ in hosts]
    x = torch.randn(8, 1024, device="cuda")
    copy = torch.cuda.Stream()

    def body():
        y = x
        if variant in ("one edge per region", "copies only"):
            copy.wait_stream(torch.cuda.current_stream())  # the copy stream joins once, at the start
        events = []
        for r in range(REGIONS):
            if variant == "two edges per region (fx_offload)":
                copy.wait_stream(torch.cuda.current_stream())
            if variant != "compute only":
                with torch.cuda.stream(copy):
                    for i in (2 * r, 2 * r + 1):
                        bufs[i].copy_(hosts[i], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy)
                events.append(done)
        for r in range(REGIONS):
            if variant != "compute only":
                torch.cuda.current_stream().wait_event(events[r])
            if variant != "copies only":
                for _ in range(KERNELS):
                    y = y * 1.0001
        if variant != "compute only":
            torch.cuda.current_stream().wait_stream(copy)
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def measure(graph) -> dict:
    launch, per_call = [], []
    for _ in range(60):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        graph.replay()
        launch.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end))
    return {"replay_cpu_ms": statistics.median(launch[10:]), "per_call_ms": statistics.median(per_call[10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="launch_probe.json")
    args = parser.parse_args()
    variants = ["two edges per region (fx_offload)", "one edge per region", "copies only", "compute only"]
    bandwidth = bench.bandwidth(torch.device("cuda"))  # bytes per second, best of 10 GiB copies
    floor = 2 * REGIONS * NUMEL * 2 / bandwidth * 1e3
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s: the copies alone take {floor:.3f} ms")
    rows = []
    for variant in variants:
        row = {"variant": variant, **measure(build(variant))}
        rows.append(row)
        print(
            f"{variant:36} replay CPU {row['replay_cpu_ms']:.3f} ms  per call {row['per_call_ms']:.3f} ms",
            flush=True,
        )
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "copy_floor_ms": floor,
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
