"""Offload on models that Dynamo splits into many graphs: where the time of a forward goes.

    python benchmarks/bench_graph_breaks.py                       # tiny towers: CPU (or GPU), minutes
    python benchmarks/bench_graph_breaks.py --size full           # 3B/7B sizes: a GPU
    python benchmarks/bench_graph_breaks.py --profile             # also cProfile fx_offload per call
    python benchmarks/bench_graph_breaks.py --version-costs       # only: ways to see in-place writes
    python benchmarks/bench_graph_breaks.py --parts               # only: where each row's host time goes
    python benchmarks/bench_graph_breaks.py --api                 # only: each row's runtime calls, timed

Models (random weights, built from configs, no download):

* ``omni``: Qwen2.5-Omni's vision and audio towers (the thinker of ``examples/qwen_omni.py``
  without its language model), one image and one audio clip per forward;
* ``vl``: Qwen2.5-VL's vision tower (``tests/graph_break_models.py``), one image; at ``--size full``
  the 3B and 7B models' towers (``vl3b``, ``vl7b``).

Rows, each on its own copy of the model (same weights), compiled (default mode, or ``--mode``),
timed in rounds that interleave the rows so that a noisy machine affects them alike:

* ``resident``: nothing offloaded, plain Inductor;
* ``stream``: the towers streamed (``{"visual", "audio_tower.layers"}``: the audio tower's front end
  runs outside compiled graphs, so it stays resident, as the example does);
* ``stream, vectors too``: ``stream`` with ``keep_vectors=0``: the towers' norm weights and
  biases streamed too (``stream`` keeps them on the device: 0.08% of the towers' bytes);
* ``swap, one at a time``: each tower a swapped component, the device budget the larger one's;
* ``swap, both fit``: a budget that holds both (after the first forward nothing crosses the bus).
  The vision-only models have one tower, so one ``swap`` row.

On a GPU, the peers too, run eagerly as their users run them (not compiled; hooks move the
weights): ``resident eager`` (no offload, no compile), ``accelerate cpu_offload`` on each tower
(a hook per module with weights copies them in before its forward, from pageable host memory)
and ``diffusers stream`` (``apply_group_offloading``, block level, one block per group, on a
copy stream, the next group prefetched). The peers offload the whole audio tower (its front end
too): their hooks need a module that runs a forward.

Columns (per forward; medians over the rounds):

* ``ms``: the forward, from the call to its outputs (a device sync after each call); on a CPU the
  CPU time of the thread that runs it (``time.thread_time``: the machine may be shared), with the
  wall time in the JSON;
* ``compute``: the ``resident`` row's time: the same kernels with no offload;
* ``copy``: exposed copy time: ``ms`` minus the time of the same row on a copy of the model whose
  host tensors were moved onto the device (``fx_offload`` then copies device to device, at the
  memory's rate instead of the bus's: nearly free; its copies still take a few percent of a
  forward of the bus time at most). Only on a GPU: on a CPU host and device are the same memory,
  no copy crosses a bus and this column is ``-``;
* ``over``: the row's time over ``resident``'s, paired: the median over rounds of the difference
  between the two rows' times in the same round (a slow stretch of a shared host slows both);
* ``overhead``: ``over - copy``: what offloading costs besides its copies: the wrappers,
  the custom ops, the runtime's Python per graph call, and kernels that wait for a copy in
  ways the no-copy run hides (so it is a bound). On a CPU it is the whole excess over resident;
* ``x res``: paired as ``over`` is: the median over rounds of the row's time over ``resident``'s;
* ``x floor``: paired too, over ``max(resident, the towers' bytes / bus rate)``, the rate measured
  once at the start (pinned host to device, the best of ten 1 GiB copies; the line above the
  table gives it); on a CPU the floor is ``resident``;
* ``peak GB`` (GPU): device memory the row holds at rest (its weights, arena and head buffers,
  measured as the allocation its set-up added) plus the most its forward allocated beyond that;
* ``max |diff|``: the largest difference of the outputs to the ``resident`` row's.

Under each offloaded row, one forward's calls with heads by where their heads' copy was issued
(``fx_offload.sequence.Origin``: by the graph's own previous call, by another graph's prefetch,
between forwards, or not before the call) and how many such prefetches there were. With few
``--rounds`` on a shared CPU a row can read faster than ``resident``: noise, not a gain.

On a CPU the script sets one thread (``torch.set_num_threads(1)``): the ratio to resident is then
the per-call overhead ratio without thread noise. ``--profile`` runs each offloaded row under
cProfile for ``--profile-calls`` forwards and prints, per forward, the time spent in each
fx_offload function and in the torch frames that fx_offload calls, in microseconds (profiling
inflates Python-heavy frames; compare rows, not absolute times). ``--parts`` (instead of the
table) compiles the rows with a timer around each part of a graph call and prints, per forward,
the host time spent in the compiled graphs' calls, in the wrapper before them (the heads' check
and the call sequence, ``GraphRuntime.enter``; swapped components put in place), passing the
head buffers (``passed``) and after them (the refills and prefetches, ``leave``), and between the
graphs (the model's eager code, Dynamo's frames and guards, the wrappers' own frames): medians of
``--rounds`` x ``--calls`` forwards, each timed to a device sync. Each timer adds a Python frame
and two clock reads per call. The JSON (``--json``) holds the device, torch version, date,
commit, command line and every sample.

``--api`` (instead of the table) runs every row's forwards under ``torch.profiler``, the rows
interleaved (one forward each per round, the order rotating, so a host that slows down over the
run slows every row alike), and prints per row the calls that cost the most host time: on a GPU
the CUDA runtime's (``cudaLaunchKernel``, ``cudaMemcpyAsync``, event records and waits), on a CPU
torch's operators; per forward, how many, and the host time of one. A call that every row makes
as often but that takes longer in one row says that row slows the host's work around it, not
that it adds work: the last lines weigh that, over the calls each row makes as often as
``resident``, by resident's time in each.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import json
import math
import operator
import pstats
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_offload import bandwidth, diffusers_stream, environment  # noqa: E402

import fx_offload  # noqa: E402
from fx_offload.backend import offload_inductor  # noqa: E402


@dataclass
class Workload:
    """A model to offload, the inputs of a forward, and the rows' patterns."""

    name: str
    model: nn.Module  # on the CPU; each row offloads its own copy
    inputs: tuple
    rows: dict[str, tuple[dict | None, dict]]  # row -> (patterns, offload kwargs)
    towers: dict[str, int] = field(default_factory=dict)  # tower -> bytes
    peer_modules: tuple[str, ...] = ()  # the towers' module names, for the peers' hooks


class OmniTowers(nn.Module):
    """Qwen2.5-Omni's thinker reduced to its towers: image features and audio features."""

    def __init__(self, thinker: nn.Module) -> None:
        super().__init__()
        self.thinker = thinker

    def forward(self, pixel_values, image_grid_thw, input_features, feature_attention_mask):
        image = self.thinker.get_image_features(pixel_values, image_grid_thw)
        audio = self.thinker.get_audio_features(input_features, feature_attention_mask)
        return image.last_hidden_state, *image.pooler_output, audio.last_hidden_state


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def omni(size: str, dtype: torch.dtype) -> Workload:
    sys.path.insert(0, str(ROOT / "examples"))
    import qwen_omni

    model, inputs = qwen_omni.build(size, torch.device("cpu"), dtype)
    thinker = model.thinker
    del thinker.model, thinker.lm_head  # the towers alone
    towers = OmniTowers(thinker).eval()
    visual, audio = _bytes(thinker.visual), _bytes(thinker.audio_tower.layers)
    names = ("pixel_values", "image_grid_thw", "input_features", "feature_attention_mask")
    stream = {"visual": "stream", "audio_tower.layers": "stream"}
    swap = {"visual": "swap", "audio_tower.layers": "swap"}
    rows = {
        "resident": (None, {}),
        "stream": (stream, {}),
        "stream, vectors too": (stream, {"keep_vectors": 0}),
        "swap, one at a time": (swap, {}),
        "swap, both fit": (swap, {"device_budget": visual + audio + (1 << 20)}),
    }
    return Workload(
        f"omni-{size}",
        towers,
        tuple(inputs[n] for n in names),
        rows,
        {"visual": visual, "audio": audio},
        ("thinker.visual", "thinker.audio_tower"),
    )


def vl(size: str, dtype: torch.dtype) -> Workload:
    from tests.graph_break_models import vision_tower

    model, inputs = vision_tower(size, "cpu", dtype)
    stream = {"visual": "stream"}
    rows = {
        "resident": (None, {}),
        "stream": (stream, {}),
        "stream, vectors too": (stream, {"keep_vectors": 0}),
        "swap": ({"visual": "swap"}, {}),
    }
    return Workload(f"vl-{size}", model, inputs, rows, {"visual": _bytes(model.visual)}, ("visual",))


def _accelerate(model: nn.Module, modules: list[nn.Module], device: torch.device) -> None:
    from accelerate import cpu_offload

    for module in modules:
        cpu_offload(module, execution_device=device)


def _diffusers(model: nn.Module, modules: list[nn.Module], device: torch.device) -> None:
    for module in modules:
        diffusers_stream(module, device, "block_level")


# peers (GPU only): the towers offloaded by forward hooks, the model run eagerly, as their users run it
PEERS: dict[str, Callable[[nn.Module, list[nn.Module], torch.device], None] | None] = {
    "resident eager": None,
    "accelerate cpu_offload": _accelerate,
    "diffusers stream": _diffusers,
}

WORKLOADS: dict[str, Callable[[str, torch.dtype], Workload]] = {
    "omni": lambda size, dtype: omni(size, dtype),
    "vl": lambda size, dtype: vl("tiny" if size == "tiny" else "3B", dtype),
    "vl3b": lambda size, dtype: vl("3B", dtype),
    "vl7b": lambda size, dtype: vl("7B", dtype),
}


@dataclass
class Row:
    name: str
    model: nn.Module
    call: Callable
    plan: object
    rest_bytes: int
    free_copies: bool = False
    samples: list[float] = field(default_factory=list)
    wall_samples: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    outputs: tuple = ()
    counts: dict = field(default_factory=dict)  # fx_offload's counters over one forward
    peer: bool = False  # eager, offloaded by another library's hooks (or none: resident eager)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _to(inputs: tuple, device: torch.device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _tensors(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(t for item in out for t in _tensors(item)) if isinstance(out, (tuple, list)) else ()


def inductor(mode: str | None, timed: Callable | None = None) -> Callable:
    """Inductor as ``torch.compile(backend="inductor", mode=mode)`` runs it, as a plain function
    (see ``set_up``); ``timed``: ``Parts.timed``, put around each compiled graph."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}

    def backend(gm, inputs):
        compiled = compile_fx(gm, inputs, config_patches=patches)
        return timed("graph calls", compiled) if timed is not None else compiled

    return backend


class Parts:
    """Host time per forward in each part of the compiled-graph calls, by timers wrapped around
    them (``--parts``): ``install`` wraps the wrapper's parts and every graph the offload backend
    compiles; ``inductor(mode, Parts.timed)`` is the resident row's backend with the same timer."""

    PARTS = ("graph calls", "before calls", "passing heads", "after calls")

    def __init__(self) -> None:
        self.spent = dict.fromkeys(self.PARTS, 0.0)

    def timed(self, part: str, fn: Callable) -> Callable:
        spent, clock = self.spent, time.perf_counter

        def call(*args):
            start = clock()
            try:
                return fn(*args)
            finally:
                spent[part] += clock() - start

        if getattr(fn, "_boxed_call", False):
            call._boxed_call = True
        return call

    def install(self) -> None:
        """Before any compile (the wrapper binds ``enter`` and ``leave`` when it is made)."""
        from fx_offload import backend, runtime

        graph = runtime.GraphRuntime
        methods = {"before calls": "enter", "passing heads": "passed", "after calls": "leave"}
        for part, method in methods.items():
            setattr(graph, method, self.timed(part, getattr(graph, method)))
        swapped = backend._SwappedInputs  # (its components put on the device, before the call)
        swapped.ensure = self.timed("before calls", swapped.ensure)
        around = backend._around_calls
        backend._around_calls = lambda compiled, setup: around(self.timed("graph calls", compiled), setup)

    def measure(self, rows: list[Row], device: torch.device, rounds: int, calls: int) -> list[dict]:
        """Each row's forwards, the parts' times of each; rows interleaved per round."""
        samples: dict[str, list[dict]] = {row.name: [] for row in rows}
        for r in range(rounds):
            for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
                for _ in range(calls):
                    _sync(device)
                    self.spent.update(dict.fromkeys(self.PARTS, 0.0))
                    start = time.perf_counter()
                    row.call()
                    _sync(device)
                    forward = time.perf_counter() - start
                    parts = {part: spent * 1e3 for part, spent in self.spent.items()}
                    samples[row.name].append({"forward": forward * 1e3, **parts})
        results = []
        head = ("row", "forward", "graph calls", "before", "passing", "after", "between")
        print("\n{:22} {:>8} {:>11} {:>8} {:>8} {:>8} {:>8}".format(*head))
        for row in rows:
            found = samples[row.name]
            median = {key: statistics.median(s[key] for s in found) for key in found[0]}
            between = statistics.median(s["forward"] - sum(s[p] for p in self.PARTS) for s in found)
            results.append({"row": row.name, "ms": median, "between_ms": between, "samples_ms": found})
            print(
                f"{row.name:22} {median['forward']:8.2f} {median['graph calls']:11.2f} "
                f"{median['before calls']:8.2f} {median['passing heads']:8.2f} {median['after calls']:8.2f} "
                f"{between:8.2f}"
            )
        return results


def set_up(
    work: Workload,
    name: str,
    device: torch.device,
    mode: str | None,
    free_copies: bool,
    parts: Parts | None = None,
) -> Row:
    """Offload a copy of the model for row ``name``, compile it (with ``parts``' timers, if given),
    run it once."""
    before = _allocated(device)
    model = copy.deepcopy(work.model)
    if name in PEERS:
        model.to(device)
        if PEERS[name] is not None:
            PEERS[name](model, [model.get_submodule(m) for m in work.peer_modules], device)

        def eager():
            with torch.no_grad():
                return model(*inputs)

        inputs = _to(work.inputs, device)
        outputs = _tensors(eager())
        _sync(device)
        return Row(name, model, eager, None, _allocated(device) - before, outputs=outputs, peer=True)
    patterns, kwargs = work.rows[name]
    plan = None
    if patterns is None:
        model.to(device)
    else:
        plan = fx_offload.offload(model, patterns, device=device, **kwargs)
        if free_copies:  # every copy becomes device to device: see the docstring's ``copy``
            for record in plan.records:
                record.host = record.host.to(device)
    # a backend object of its own per row: Dynamo reuses a cached graph wherever its guards pass,
    # and they do not tell one model's offloaded parameters from another's (both are
    # OffloadedParameters), so rows sharing the backend would run each other's graphs. Resident's
    # is a plain function too: the rows' code objects share Dynamo's caches, and each frame's
    # lookup compares its backend with the cached entries' until one matches: Python's ``__eq__``
    # of ``backend="inductor"``'s wrapper for every other row, C-level for a function
    if plan is not None:
        backend = functools.partial(offload_inductor, mode=mode)
    else:
        backend = inductor(mode, parts.timed if parts is not None else None)
    compiled = torch.compile(model, backend=backend)
    inputs = _to(work.inputs, device)

    def call():
        with torch.no_grad():
            return compiled(*inputs)

    fresh_dynamo_state()
    outputs = _tensors(call())
    _sync(device)
    label = f"{name} (copies free)" if free_copies else name
    return Row(label, model, call, plan, _allocated(device) - before, free_copies, outputs=outputs)


def fresh_dynamo_state() -> None:
    """Compile the next row as the first model of a process would be compiled.

    Dynamo's automatic dynamic shapes keep, per code object and for the whole process, which
    input sizes changed between its compiles. The rows run the same transformers code, so without
    this a row compiled after another starts from the dimensions that the other found changing:
    its graphs take symbolic sizes from their first compile, and each call of them does more work
    on the host (size computations, marking outputs dynamic). On the H200, with resident compiled
    first, the full Omni towers' next rows ran 24 of their vision attention's calls per forward
    outside the graphs that resident ran them in: about 3 ms per forward for that alone."""
    reset = getattr(getattr(torch._dynamo, "pgo", None), "reset_code_state", None)
    if reset is not None:
        reset()


def measure(rows: list[Row], device: torch.device, rounds: int, calls: int) -> None:
    """``rounds`` rounds; in each, every row (in turn, the order rotating) runs ``calls`` forwards,
    each timed with a sync; a row's samples are the per-round medians. On a CPU each forward is
    timed by the thread's CPU time (one thread computes it all), so the time other processes take
    the core from it is not counted; the wall time is kept beside it."""
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    for r in range(rounds):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            times, walls = [], []
            for _ in range(calls):
                w0, t0 = time.perf_counter(), clock()
                row.call()
                _sync(device)
                times.append((clock() - t0) * 1e3)
                walls.append((time.perf_counter() - w0) * 1e3)
            row.samples.append(statistics.median(times))
            row.wall_samples.append(statistics.median(walls))
    if device.type == "cuda":
        for row in rows:
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            row.call()
            _sync(device)
            row.peak_bytes = row.rest_bytes + torch.cuda.max_memory_allocated(device) - base
    for row in rows:
        if row.plan is not None:
            counters["fx_offload"].clear()
            row.call()
            _sync(device)
            row.counts = dict(counters["fx_offload"])


def profile(row: Row, device: torch.device, calls: int) -> dict:
    """cProfile ``calls`` forwards of ``row``; per forward: fx_offload's functions and the torch
    frames they call, in microseconds."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        row.call()
        _sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    frames = []
    for (path, _line, func), (_, ncalls, tottime, cumtime, callers) in stats.items():
        ours = "fx_offload" in path
        called_by_ours = any("fx_offload" in caller[0] for caller in callers)
        if not (ours or called_by_ours):
            continue
        where = f"{Path(path).name}:{func}" if path != "~" else func
        frames.append(
            {
                "frame": where,
                "fx_offload": ours,
                "calls": ncalls / calls,
                "tot_us": tottime / calls * 1e6,
                "cum_us": cumtime / calls * 1e6,
            }
        )
    frames.sort(key=lambda f: -f["cum_us"])
    return {"row": row.name, "forward_us": total / calls * 1e6, "frames": frames}


def api_calls(rows: list[Row], device: torch.device, rounds: int, top: int) -> list[dict]:
    """``--api``: each row's runtime (GPU) or operator (CPU) calls under ``torch.profiler``, one
    forward per row per round, rows interleaved; per row and name, calls and host us per forward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prefix = "cuda" if device.type == "cuda" else "aten::"
    spent: dict[str, dict[str, list[float]]] = {row.name: {} for row in rows}
    for r in range(rounds):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            _sync(device)
            with torch_profile(activities=activities) as found:
                row.call()
                _sync(device)
            for event in found.key_averages():
                if event.key.startswith(prefix):
                    total = spent[row.name].setdefault(event.key, [0.0, 0.0])
                    total[0] += event.count / rounds
                    total[1] += event.self_cpu_time_total / rounds
    results = []
    for row in rows:
        calls = sorted(spent[row.name].items(), key=lambda item: -item[1][1])
        print(f"\n== {row.name}: per forward, the calls that cost the most host time")
        print(f"{'call':44} {'calls':>8} {'us each':>8} {'ms':>8}")
        for name, (count, us) in calls[:top]:
            print(f"{name[:44]:44} {count:8.1f} {us / count:8.2f} {us / 1e3:8.2f}")
        results.append({"row": row.name, "calls": {n: {"calls": c, "us": us} for n, (c, us) in calls}})
    # the calls a row makes as often as resident does (within 1%): the host time of one, against
    # resident's, weighted by resident's time in each; above 1, the row slows work it does not add
    resident = next((row for row in rows if row.plan is None and not row.peer), None)
    base = spent[resident.name] if resident is not None else {}
    for row, result in zip(rows, results):
        if row is resident or not base:
            continue
        same = []  # (resident's time in the call, the row's time per call over resident's)
        for name, (count_base, us_base) in base.items():
            count, us = spent[row.name].get(name, (0.0, 0.0))
            if us_base > 0 and count and abs(count - count_base) <= 0.01 * count_base:
                same.append((us_base, (us / count) / (us_base / count_base)))
        if same:
            slower = sum(w * r for w, r in same) / sum(w for w, _ in same)
            result["shared_calls_vs_resident"] = slower
            print(f"{row.name}: its {len(same)} kinds of call made as often as resident's take {slower:.2f}x")
    return results


def print_profile(result: dict, top: int) -> None:
    print(f"\n== cProfile, {result['row']}: {result['forward_us']:.0f} us per forward under the profiler")
    print(f"{'frame':58} {'calls':>7} {'cum us':>9} {'own us':>9}")
    for frame in result["frames"][:top]:
        mark = "" if frame["fx_offload"] else "  (torch)"
        name = (frame["frame"] + mark)[:58]
        print(f"{name:58} {frame['calls']:7.1f} {frame['cum_us']:9.1f} {frame['tot_us']:9.1f}")


def table(work: Workload, rows: list[Row], device_name: str, rate: float) -> tuple[list[dict], dict]:
    """Print and return the rows' results, and the floor: the towers' bytes over the measured
    host-to-device ``rate`` (bytes per second; NaN on a CPU, where the floor is resident)."""
    resident = next(r for r in rows if r.plan is None and not r.peer)
    compute = statistics.median(resident.samples)
    moved = sum(work.towers.values())
    transfer = 0.0 if math.isnan(rate) else moved / rate * 1e3
    free = {
        r.name.removesuffix(" (copies free)"): statistics.median(r.samples) for r in rows if r.free_copies
    }
    results = []
    towers = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in work.towers.items())
    print(f"\n{work.name} on {device_name}: towers {towers}")
    if transfer:
        print(
            f"the towers' {moved / 1e9:.2f} GB at {rate / 1e9:.1f} GB/s (measured, pinned host to device): "
            f"{transfer:.1f} ms; floor per forward max(resident, that)"
        )
    head = ("row", "ms", "compute", "over", "copy", "overhead", "x res", "x floor", "peak GB", "max |diff|")
    print("{:34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7} {:>10}".format(*head))
    for row in rows:
        ms = statistics.median(row.samples)
        copy_ms = ms - free[row.name] if row.name in free and not row.free_copies else None
        # paired with resident's sample of the same round: the host's slow stretches cancel
        over = statistics.median(a - b for a, b in zip(row.samples, resident.samples))
        ratio = statistics.median(a / b for a, b in zip(row.samples, resident.samples))
        x_floor = statistics.median(a / max(b, transfer) for a, b in zip(row.samples, resident.samples))
        overhead = over - (copy_ms or 0.0)
        diff = max(
            ((a.float() - b.float()).abs().max().item() for a, b in zip(row.outputs, resident.outputs)),
            default=0.0,
        )
        result = {
            "row": row.name,
            "ms": ms,
            "compute_ms": compute,
            "copy_ms": copy_ms,
            "over_ms": over,
            "overhead_ms": overhead,
            "ratio": ratio,
            "x_floor": x_floor,
            "peak_gb": row.peak_bytes / 1e9 if row.peak_bytes is not None else None,
            "max_abs_diff": diff,
            "samples_ms": row.samples,
            "wall_ms": statistics.median(row.wall_samples),
            "wall_samples_ms": row.wall_samples,
            "outside_graphs": row.plan.outside_graphs() if row.plan is not None else [],
            "swap_ins": {c.name: c.swap_ins for c in row.plan.components} if row.plan is not None else {},
            "counters": row.counts,
        }
        results.append(result)
        shown_copy = f"{copy_ms:8.3f}" if copy_ms is not None else f"{'-':>8}"
        peak = f"{result['peak_gb']:7.2f}" if result["peak_gb"] is not None else f"{'-':>7}"
        print(
            f"{row.name:34} {ms:9.3f} {compute:8.3f} {over:8.3f} {shown_copy} {overhead:8.3f} {ratio:6.2f} "
            f"{x_floor:7.2f} {peak} {diff:10.2e}"
        )
    for result in results:
        copies = {
            k.removeprefix("head_copy_"): v
            for k, v in result["counters"].items()
            if k.startswith("head_copy")
        }
        if copies:
            shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in copies.items())
            prefetches = result["counters"].get("cross_graph_prefetches", 0)
            print(
                f"  {result['row']}: calls with heads, by where their copy was issued: {shown}; "
                f"{prefetches} prefetches into another graph's heads (one forward)"
            )
        if result["outside_graphs"]:
            print(
                f"  {result['row']}: {len(result['outside_graphs'])} offloaded parameters read outside graphs"
            )
    return results, {"towers_bytes": moved, "bandwidth_bytes_per_s": rate, "transfer_ms": transfer}


def _version_candidates(params: list[nn.Parameter]) -> dict[str, Callable[[], object]]:
    getter = operator.attrgetter("_version")
    versions = tuple(p._version for p in params)
    refs = [weakref.ref(p) for p in params]
    stamp = [0]
    # a call's inputs: its weights among as many activations, at positions known at compile time
    args = [x for p in params for x in (torch.zeros(1), p)]
    pick = operator.itemgetter(*range(1, len(args), 2))
    return {
        "C-level from the call's inputs: tuple(map(getter, pick(args)))": lambda: tuple(
            map(getter, pick(args))
        ),
        "python loop: tuple(p._version for p in params)": lambda: tuple(p._version for p in params),
        "python loop through weakrefs (record.param())": lambda: tuple(r()._version for r in refs),
        "C-level: tuple(map(attrgetter('_version'), params))": lambda: tuple(map(getter, params)),
        "C-level, compared: tuple(map(...)) == held": lambda: tuple(map(getter, params)) == versions,
        "one stamp per component (an int compare)": lambda: stamp[0] == 0,
    }


def version_costs(counts=(12, 50, 500), repeats: int = 2000) -> list[dict]:
    """The cost of seeing in-place writes on a call's path, for ``counts`` parameters: ways to read
    every version counter, against one check per component (best of five runs of ``repeats``)."""
    results = []
    for n in counts:
        params = [nn.Parameter(torch.zeros(4)) for _ in range(n)]
        for name, fn in _version_candidates(params).items():
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
            results.append({"params": n, "candidate": name, "us": best})
    print(f"\n{'params':>6}  {'us per call':>11}  candidate")
    for r in results:
        print(f"{r['params']:6d}  {r['us']:11.2f}  {r['candidate']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument(
        "--models", default=None, help="comma-separated: omni, vl, vl3b, vl7b (default: all for the size)"
    )
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="forwards per row per round")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=25, help="frames shown per profile")
    parser.add_argument(
        "--version-costs", action="store_true", help="only measure ways to see in-place writes"
    )
    parser.add_argument("--rows", nargs="+", default=None, help="rows to run (default: all the model has)")
    parser.add_argument(
        "--no-twins", action="store_true", help="on a GPU, skip the 'copies free' twin of each row"
    )
    parser.add_argument(
        "--parts", action="store_true", help="only time each part of the graph calls (see above)"
    )
    parser.add_argument(
        "--api",
        action="store_true",
        help="only profile each row's runtime calls, rows interleaved (see above)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # every row compiles the same code objects again
    report = {
        "environment": {
            **environment(device),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "threads": torch.get_num_threads(),
        },
        "workloads": [],
    }
    parts = Parts() if args.parts else None
    if parts is not None:
        parts.install()
    if args.version_costs:
        report["version_costs"] = version_costs()
    else:
        default = "omni,vl" if args.size == "tiny" else "omni,vl3b,vl7b"
        dtype = torch.float32 if args.size == "tiny" else torch.bfloat16
        # the bus's rate for the table's floor: once, before any model holds device memory
        rate = bandwidth(device) if parts is None and not args.api else math.nan
        cuda = device.type == "cuda"
        for key in (args.models or default).split(","):
            if key not in WORKLOADS:
                raise SystemExit(f"--models: unknown model {key!r}; choose from {sorted(WORKLOADS)}")
            work = WORKLOADS[key](args.size, dtype)
            known = list(work.rows) + (list(PEERS) if cuda else [])
            # the peers by default only in the table: --parts and --api look at fx_offload's calls
            chosen = args.rows or (known if parts is None and not args.api else list(work.rows))
            unknown = [name for name in chosen if name not in known]
            if unknown:
                where = "" if cuda else " on a CPU (the peers' rows need a GPU)"
                raise SystemExit(f"--rows: unknown {unknown}; {work.name} has the rows {known}{where}")
            if "resident" not in chosen:
                raise SystemExit("--rows: include 'resident', every row's reference")
            rows = []
            for name in chosen:
                rows.append(set_up(work, name, device, args.mode, free_copies=False, parts=parts))
                twins = cuda and not args.no_twins and parts is None and not args.api
                if twins and name in work.rows and work.rows[name][0] is not None:
                    rows.append(set_up(work, name, device, args.mode, free_copies=True))
            env = report["environment"]
            host = f"{env['host_cpu']}, {env['host_cpus']} CPUs, kernel {env['host_kernel']}"
            device_name = f"{env['device']} (host: {host})"
            if parts is not None:
                print(f"\n{work.name} on {device_name}: host ms per forward, medians")
                entry = {"name": work.name, "parts": parts.measure(rows, device, args.rounds, args.calls)}
            elif args.api:
                print(f"\n{work.name} on {device_name}: runtime calls, {args.rounds} forwards per row")
                entry = {"name": work.name, "api": api_calls(rows, device, args.rounds, args.top)}
            else:
                measure(rows, device, args.rounds, args.calls)
                found_rows, floor = table(work, rows, device_name, rate)
                entry = {"name": work.name, "towers_bytes": work.towers, "floor": floor, "rows": found_rows}
            if args.profile and parts is None:
                entry["profiles"] = []
                for row in rows:
                    if not row.free_copies:
                        found = profile(row, device, args.profile_calls)
                        print_profile(found, args.top)
                        entry["profiles"].append(found)
            report["workloads"].append(entry)
            for row in rows:
                if row.plan is not None:
                    fx_offload.restore(row.model)
            del rows
            torch._dynamo.reset()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
