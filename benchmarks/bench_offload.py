"""fx_offload against the transfer floor and the peers, side by side in one process per case.

For each case: build a stack of residual MLP blocks (bf16, no bias), offload every k-th block,
measure host->device bandwidth in the same process, then time each method on the same weights
and inputs and report time, ratio to the floor ``max(best resident compiled time, offloaded
bytes / bandwidth)``, peak device memory, host memory and the error against the resident model.

    python benchmarks/bench_offload.py                     # every case, a table and JSON
    python benchmarks/bench_offload.py --case decode_T8    # one case
    python benchmarks/bench_offload.py --smoke             # tiny sizes, CPU or GPU: checks the code runs

The first row, ``transfer only``, copies the offloaded bytes as one pinned copy and computes
nothing: the bus at the case's size, timed like the forwards.

Peers: accelerate ``cpu_offload`` (hooks), diffusers ``apply_group_offloading(..., use_stream=True)``
eager and compiled, and weights left as device-typed views of pinned memory read in place by the
kernels (what vLLM ``--cpu-offload-gb`` does). A peer that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import fx_offload
from fx_offload import placement


@dataclass(frozen=True)
class Case:
    blocks: int
    dim: int
    hidden: int
    every: int  # every k-th block is offloaded
    tokens: int


CASES = {
    "all_T256": Case(8, 4096, 16384, 1, 256),
    "all_T8192": Case(8, 4096, 16384, 1, 8192),
    "quarter_T4096": Case(16, 4096, 16384, 4, 4096),
    "decode_T8": Case(64, 1024, 4096, 8, 8),
}
SMOKE = {"smoke": Case(4, 64, 128, 2, 8)}

FX_OPTIONS: dict = {}  # --prefetch / --head / --refill-in-graph


def parse_head(text: str) -> bool | int:
    """``--head true|false|N``: fx_offload's prefetch_head (N: that many first regions)."""
    word = text.strip().lower()
    if word in ("true", "false"):
        return word == "true"
    if word.isdigit():
        return int(word)
    raise SystemExit(f"--head takes true, false or a count, got {text!r}")


METHODS = [
    "transfer only",
    "resident eager",
    "resident compiled",
    "resident reduce-overhead",
    "fx_offload compiled",
    "fx_offload reduce-overhead",
    "accelerate cpu_offload",
    "diffusers stream eager",
    "diffusers stream compiled",
    "UVA in-place eager",
    "UVA in-place compiled",
]


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(case.dim, case.hidden) for _ in range(case.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def offloaded_indices(case: Case) -> list[int]:
    return list(range(0, case.blocks, case.every))


def block_bytes(case: Case, dtype: torch.dtype) -> int:
    """The bytes of one block's weights (two ``dim x hidden`` matrices)."""
    return 2 * case.dim * case.hidden * torch.finfo(dtype).bits // 8


def build(case: Case, state: dict, device: torch.device, dtype: torch.dtype) -> Stack:
    with torch.device("meta"):
        model = Stack(case)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(state)
    return model.eval()


def bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Pinned host -> device copy bandwidth in bytes per second: the best of 10 copies after a
    warm-up (the floor is the fastest the bus went: a slow reading would flatter every row)."""
    if device.type != "cuda":
        return float("nan")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(11):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dest.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / min(times[1:])


def host_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def transfer_only(nbytes: int, device: torch.device):
    """The floor's transfer, timed like a forward: ``nbytes`` copied from pinned host memory into
    device memory as one copy, on the caller's stream, no compute. It reads the bus at the size the
    case moves, where ``bandwidth`` reads its best over 1 GiB copies."""
    cuda = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy(x: torch.Tensor) -> torch.Tensor:
        dest.copy_(host, non_blocking=cuda)
        return x

    return copy


def prepare(method: str, case: Case, state: dict, device: torch.device, dtype: torch.dtype):
    """Return a callable running one forward with ``method``, or raise if the peer is missing."""
    if method == "transfer only":
        return transfer_only(block_bytes(case, dtype) * len(offloaded_indices(case)), device)
    model = build(case, state, device, dtype)
    indices = offloaded_indices(case)
    if method.startswith("resident"):
        if method == "resident eager":
            return model
        mode = "reduce-overhead" if "reduce" in method else None
        return torch.compile(model, mode=mode)
    if method.startswith("fx_offload"):
        fx_offload.offload(model, [f"re:blocks\\.({'|'.join(map(str, indices))})"], device=device)
        options = {"triton.cudagraphs": "reduce" in method, **FX_OPTIONS}
        return torch.compile(model, backend="offload_inductor", options=options)
    if method == "accelerate cpu_offload":
        from accelerate import cpu_offload

        for i in indices:
            cpu_offload(model.blocks[i], execution_device=device)
        return model
    if method.startswith("diffusers"):
        if case.every == 1:  # every block: diffusers' block level over the stack
            diffusers_stream(model, device, "block_level")
        else:  # some blocks: leaf level on each of them
            for i in indices:
                diffusers_stream(model.blocks[i], device, "leaf_level")
        return torch.compile(model) if method.endswith("compiled") else model
    if method.startswith("UVA"):
        for i in indices:
            uva_views(model.blocks[i], device)
        return torch.compile(model) if method.endswith("compiled") else model
    raise ValueError(f"unknown method {method!r}")


def diffusers_stream(module: nn.Module, device: torch.device, offload_type: str) -> None:
    """diffusers' group offloading of ``module`` on a copy stream, from host memory to ``device``:
    ``offload_type`` ``block_level`` (one block of its stacks per group, the next prefetched) or
    ``leaf_level``."""
    from diffusers.hooks import apply_group_offloading

    blocks = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        use_stream=True,
        **blocks,
    )


def uva_views(module: nn.Module, device: torch.device) -> None:
    """Leave ``module``'s parameters in pinned host memory, each replaced by a device-typed view of
    it that kernels read in place over the bus (what vLLM ``--cpu-offload-gb`` does)."""
    for param in module.parameters():
        host, _ = placement._host_copy(param.data, device, device.type == "cuda", "uva")
        param.data = placement._device_alias(host, device)


def time_back_to_back(fn, x: torch.Tensor, calls: int = 20, samples: int = 5, budget_s: float = 2.0) -> float:
    """Milliseconds per forward when ``calls`` forwards are issued back to back, one sync at the end
    (a serving loop that queues the next step while the GPU runs this one): the median of
    ``samples`` such runs, fewer where they pass ``budget_s`` (one run reads the bus's moments: on
    the H100 a lone run of 20 calls ranged 0.98-1.09x of the floor where the median of eight was
    1.01x)."""
    if x.device.type != "cuda":
        return float("nan")
    runs = []
    with torch.no_grad():
        fn(x)
        while len(runs) < samples and sum(runs) * calls / 1e3 < budget_s:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(x)
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / calls)
    return statistics.median(runs)


_idle: dict = {}


def issued_now() -> torch.cuda.Event:
    """A timing event that stamps the moment the CPU issues it: recorded on a stream with no work,
    so that it waits for nothing. A call's window starts there even while the GPU still finishes
    earlier work (a refill in flight), which the call then waits for inside its window."""
    if "stream" not in _idle:
        _idle["stream"] = torch.cuda.Stream()
    event = torch.cuda.Event(enable_timing=True)
    event.record(_idle["stream"])
    return event


def time_forward(fn, x: torch.Tensor, budget_s: float) -> tuple[float, int]:
    """Median milliseconds of one forward, after warm-up, from the moment the CPU issues it
    (``issued_now``) to a device event after it, with a sync after it (what one request waits: the
    CPU time to issue the call counts, and so does any GPU work it queues behind)."""
    cuda = x.device.type == "cuda"
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
        times, spent = [], 0.0
        while len(times) < 5 or (spent < budget_s and len(times) < 50):
            if cuda:
                start, end = issued_now(), torch.cuda.Event(enable_timing=True)
                fn(x)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn(x)
                ms = (time.perf_counter() - t0) * 1e3
            times.append(ms)
            spent += ms / 1e3
    return statistics.median(times), len(times)


def _measure(
    method: str,
    case: Case,
    state: dict,
    device: torch.device,
    dtype: torch.dtype,
    x: torch.Tensor,
    reference: torch.Tensor,
) -> dict:
    """One row, once: prepare ``method`` (alone on the device), time it, free it."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    row: dict = {"method": method}
    rss = host_rss()
    fn = None
    windows: list = []  # (prefetch, heads) the backend chose for each graph it compiled
    choose = fx_offload.backend.window

    def recorded(*args):  # seen even where Inductor's cache skips the pass itself
        windows.append(list(choose(*args)))
        return tuple(windows[-1])

    in_graph: list = []  # refill_in_graph bytes 'auto' chose for each graph's heads
    estimated = fx_offload.rewrite._auto_in_graph

    def estimating(*args):  # not seen where Inductor's cache skips the pass
        in_graph.append(estimated(*args))
        return in_graph[-1]

    fx_offload.backend.window, fx_offload.rewrite._auto_in_graph = recorded, estimating
    try:
        fn = prepare(method, case, state, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(x).float()
        row["first_call_s"] = time.perf_counter() - t0
        row["ms"], row["iterations"] = time_forward(fn, x, budget_s=1.0)
        row["ms_back_to_back"] = time_back_to_back(fn, x)
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        row["host_gb"] = max(host_rss() - rss, 0) / 1e9
        if method != "transfer only":  # it computes nothing
            row["rel_err"] = ((out - reference).norm() / reference.norm()).item()
        if windows:
            row["prefetch_heads"] = windows
        if in_graph:
            row["refill_in_graph_auto"] = in_graph
    except ImportError as error:
        row["error"] = f"not installed: {error.name}"
    except Exception as error:  # a peer that fails is a result too
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        traceback.print_exc()
    finally:
        fx_offload.backend.window, fx_offload.rewrite._auto_in_graph = choose, estimated
    del fn
    return row


def _merge(runs: list[dict]) -> dict:
    """One row from its rounds: the median of the rounds' medians, with every round kept."""
    row = dict(runs[0])
    if "error" in row or len(runs) == 1:
        return row
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    row["ms_rounds"] = [r["ms"] for r in runs]
    row["ms_back_to_back_rounds"] = [r["ms_back_to_back"] for r in runs]
    row["ms"] = statistics.median(row["ms_rounds"])
    row["ms_back_to_back"] = statistics.median(row["ms_back_to_back_rounds"])
    if row["peak_gb"] is not None:
        row["peak_gb"] = max(r["peak_gb"] for r in runs)
    row["host_gb"] = max(r["host_gb"] for r in runs)
    if "rel_err" in row:
        row["rel_err"] = max(r["rel_err"] for r in runs)
    return row


def _is_peer(method: str) -> bool:
    return not method.startswith(("transfer", "resident", "fx_offload"))


def run_case(name: str, case: Case, device: torch.device, methods: list[str], rounds: int = 1) -> dict:
    """Time every method of one case. With ``rounds`` > 1 the resident and fx_offload rows are
    timed again in each later round, interleaved (the floor and fx_offload drift together with
    the machine); the peers once, in the first."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # made on the device (fast init), kept on the host (honest peaks)
        state = {k: v.to(dtype).cpu() for k, v in Stack(case).state_dict().items()}
    x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype)
    with torch.no_grad():
        reference = build(case, state, device, dtype)(x).float()
    block = block_bytes(case, dtype)
    offloaded_bytes = block * len(offloaded_indices(case))
    bw = bandwidth(device)
    bw_region = bandwidth(device, block // 2)  # one parameter of one block per copy
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for round_ in range(rounds):
        for method in methods:
            if round_ and _is_peer(method):
                continue
            runs[method].append(_measure(method, case, state, device, dtype, x, reference))
    rows = [_merge(runs[method]) for method in methods]
    # the floor from the best resident round: a slow round of the resident model must not
    # flatter the offloaded rows
    resident_runs = [
        r
        for method in ("resident compiled", "resident reduce-overhead")
        for r in runs.get(method, [])
        if "ms" in r
    ]
    resident = [r["ms"] for r in resident_runs]
    resident_b2b = [r["ms_back_to_back"] for r in resident_runs]
    bw_after = bandwidth(device)  # the bus may have been slower or faster while the rows ran
    bw = max(bw, bw_after)
    transfer_ms = offloaded_bytes / bw * 1e3 if bw == bw else float("nan")
    best_resident = min(resident) if resident else float("nan")
    floor = max(best_resident, transfer_ms) if not math.isnan(transfer_ms) else best_resident
    # the same bound for calls issued back to back: the resident model issued the same way
    best_b2b = min(resident_b2b) if resident_b2b else float("nan")
    floor_b2b = max(best_b2b, transfer_ms)
    for row in rows:
        if "ms" in row:
            row["x_floor"] = row["ms"] / floor
            row["x_floor_back_to_back"] = row["ms_back_to_back"] / floor_b2b
        if "ms_rounds" in row:  # every round against the same floor (the best resident of all)
            row["x_floor_rounds"] = [ms / floor for ms in row["ms_rounds"]]
            row["x_floor_back_to_back_rounds"] = [ms / floor_b2b for ms in row["ms_back_to_back_rounds"]]
    return {
        "case": name,
        "shape": asdict(case),
        "offloaded_bytes": offloaded_bytes,
        "bandwidth_gbs": bw / 1e9,
        "bandwidth_after_gbs": bw_after / 1e9,
        "bandwidth_one_parameter_gbs": bw_region / 1e9,
        "fx_offload_options": FX_OPTIONS,
        "transfer_ms": transfer_ms,
        "rounds": rounds,
        "best_resident_compiled_ms": best_resident,
        "floor_ms": floor,
        "best_resident_back_to_back_ms": best_b2b,
        "floor_back_to_back_ms": floor_b2b,
        "rows": rows,
    }


def table(result: dict) -> str:
    shape = result["shape"]
    lines = [
        f"{result['case']}: {shape['blocks']} blocks {shape['dim']}x{shape['hidden']}, every "
        f"{shape['every']} offloaded, T={shape['tokens']}; "
        f"offloaded {result['offloaded_bytes'] / 1e9:.3f} GB "
        f"at {result['bandwidth_gbs']:.1f} GB/s = {result['transfer_ms']:.2f} ms "
        f"({result['bandwidth_one_parameter_gbs']:.1f} GB/s for one parameter); "
        f"floor {result['floor_ms']:.2f} ms, back to back {result.get('floor_back_to_back_ms', 0):.2f} ms",
        f"{'method':28} {'ms':>9} {'x floor':>8} {'b2b ms':>9} {'x floor':>8} {'peak GB':>8} "
        f"{'host GB':>8} {'rel err':>9}",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['method']:28} {row['error']}")
            continue
        peak = f"{row['peak_gb']:.2f}" if row["peak_gb"] is not None else "-"
        error = f"{row['rel_err']:9.1e}" if "rel_err" in row else f"{'-':>9}"
        lines.append(
            f"{row['method']:28} {row['ms']:9.2f} {row['x_floor']:8.2f} {row['ms_back_to_back']:9.2f} "
            f"{row['x_floor_back_to_back']:8.2f} {peak:>8} "
            f"{row['host_gb']:8.2f} {error}"
        )
        if "prefetch_heads" in row:
            chosen = sorted({tuple(w) for w in row["prefetch_heads"]})
            lines.append(f"{'':28}   (prefetch, prefetch_head) per graph: {', '.join(map(str, chosen))}")
        if "refill_in_graph_auto" in row:
            estimated = ", ".join(f"{b / 2**20:.1f}" for b in sorted(set(row["refill_in_graph_auto"])))
            lines.append(f"{'':28}   refill_in_graph 'auto' per graph, MiB: {estimated}")
        if "x_floor_rounds" in row:
            per_call = " ".join(f"{r:.3f}" for r in row["x_floor_rounds"])
            b2b = " ".join(f"{r:.3f}" for r in row["x_floor_back_to_back_rounds"])
            lines.append(f"{'':28}   rounds x floor: per call {per_call}; back to back {b2b}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """What a result was measured on: the device, the host (its CPU and kernel: a forward of many
    graph calls is bound by the host, whose speed moves every row), torch, Python, the date and
    the commit."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "host_cpu": _cpu_model(),
        "host_cpus": os.cpu_count(),
        "host_kernel": platform.release(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "commit": commit(),
    }


def _cpu_model() -> str:
    """The host CPU's model name, as Linux gives it (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def commit() -> str:
    """The checkout's commit, with ``+changes`` where its tracked files differ from it."""
    root = Path(__file__).parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="case name (repeatable); default: all")
    parser.add_argument("--method", action="append", help="method name (repeatable); default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code runs")
    parser.add_argument("--json", default="bench_offload.json", help="where to write the results")
    parser.add_argument("--in-process", action="store_true", help="run the cases in this process")
    parser.add_argument("--prefetch", type=int, default=None, help="fx_offload's prefetch option")
    parser.add_argument("--head", help="fx_offload's prefetch_head: true, false or a count")
    parser.add_argument(
        "--refill-in-graph", type=int, default=None, help="fx_offload's refill_in_graph option (bytes)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the resident and fx_offload rows this many times, interleaved (peers once)",
    )
    args = parser.parse_args()
    if args.prefetch is not None:
        FX_OPTIONS["prefetch"] = args.prefetch
    if args.head is not None:
        FX_OPTIONS["prefetch_head"] = parse_head(args.head)
    if args.refill_in_graph is not None:
        FX_OPTIONS["refill_in_graph"] = args.refill_in_graph
    cases = SMOKE if args.smoke else CASES
    names = args.case or list(cases)
    methods = args.method or METHODS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.in_process and len(names) > 1:
        # one process per case: a peer that corrupts the CUDA context costs only its own case
        results = []
        for name in names:
            part = Path(args.json).with_suffix(f".{name}.json")
            command = [sys.executable, __file__, "--case", name, "--json", str(part), "--in-process"]
            command += ["--smoke"] if args.smoke else []
            command += ["--prefetch", str(args.prefetch)] if args.prefetch is not None else []
            command += ["--head", args.head] if args.head is not None else []
            if args.refill_in_graph is not None:
                command += ["--refill-in-graph", str(args.refill_in_graph)]
            command += ["--rounds", str(args.rounds)]
            for method in methods:
                command += ["--method", method]
            subprocess.run(command, check=False)
            if part.exists():
                results.extend(json.loads(part.read_text())["results"])
    else:
        results = []
        for name in names:
            results.append(run_case(name, cases[name], device, methods, args.rounds))
            print(table(results[-1]), flush=True)
    report = {"environment": environment(device), "results": results}
    Path(args.json).write_text(json.dumps(report, indent=2))
    if not args.in_process or len(names) > 1:
        print(f"\n{report['environment']}")
        for result in results:
            print("\n" + table(result))


if __name__ == "__main__":
    main()
