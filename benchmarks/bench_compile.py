"""Cold compile time against layer count: Inductor, and offload_inductor with layers or MLPs offloaded.

The model is transformers' ``Qwen2ForCausalLM`` built from a config (random weights), narrow so
that compiling dominates: what grows with the layer count is the graph. Rows:

* ``inductor``: ``torch.compile(model)``, nothing offloaded;
* ``offload layers``: every 4th decoder layer offloaded (``model.layers.0``, ``.4``, ...), compiled
  with ``backend="offload_inductor"``;
* ``offload mlps``: every 4th decoder layer's MLP offloaded, the same backend.

Each row runs in a fresh process with Inductor's caches off and its own cache directory, and times
the first call (Dynamo, AOTAutograd, Inductor, code generation and the call itself), then a
second call (so the first call's share that is running, not compiling, is visible), and for the
offload rows the time spent in the offload pass itself.

    python benchmarks/bench_compile.py                                # 9, 18, 36, 72 layers
    python benchmarks/bench_compile.py --layers 9 18 --device cpu
    python benchmarks/bench_compile.py --layers 36 --mode reduce-overhead   # a GPU, as generate() runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_offload import environment  # noqa: E402

ROWS = ["inductor", "offload layers", "offload mlps"]
EVERY = 4


def build(layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def patterns(row: str, layers: int) -> list[str]:
    suffix = ".mlp" if row == "offload mlps" else ""
    return [f"model.layers.{i}{suffix}" for i in range(0, layers, EVERY)]


def measure(row: str, layers: int, device: torch.device, mode: str | None, tokens: int) -> dict:
    """One row at one layer count, in this process (meant to be a fresh one)."""
    import fx_offload
    from fx_offload import backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(layers, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    pass_s = [0.0]
    if row == "inductor":
        compiled = torch.compile(model, mode=mode)
    else:
        fx_offload.offload(model, patterns(row, layers), device=device)
        compiled = torch.compile(model, backend="offload_inductor", mode=mode)
        rewrite = backend.rewrite

        def timed(graph, plan):
            start = time.perf_counter()
            try:
                return rewrite(graph, plan)
            finally:
                pass_s[0] += time.perf_counter() - start

        backend.rewrite = timed
    calls, cpu = [], []
    with torch.no_grad():
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), cpu_seconds()
            out = compiled(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
            calls.append(time.perf_counter() - start)
            cpu.append(cpu_seconds() - start_cpu)
    finite = bool(torch.isfinite(out).all())
    phases = {name: sum(times) for name, times in torch._dynamo.utils.compilation_time_metrics.items()}
    return {
        "row": row,
        "layers": layers,
        "first_call_s": calls[0],
        "second_call_s": calls[1],
        "first_call_cpu_s": cpu[0],
        "pass_s": pass_s[0] if row != "inductor" else None,
        "finite": finite,
        "phases_s": phases,
    }


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the C++ compiler's runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_fresh(row: str, layers: int, args) -> dict:
    """``measure`` in a new process with cold caches of its own."""
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as cache:
        env = dict(
            os.environ,
            TORCHINDUCTOR_CACHE_DIR=cache,
            TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
            TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        )
        if args.device == "cpu":  # compile in this process, so that its CPU time counts it all
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"

        command = [sys.executable, __file__, "--one", row, "--layers", str(layers), "--device", args.device]
        command += ["--tokens", str(args.tokens)] + (["--mode", args.mode] if args.mode else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"row": row, "layers": layers, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    """First call wall seconds and CPU seconds, each with its ratio to Inductor's at the same depth
    (on a shared machine the CPU seconds are the steadier reading: others' load does not add to
    them)."""
    head = (
        f"{'layers':>6}  {'row':16} {'first call s':>12} {'x inductor':>10} {'cpu s':>8} {'x inductor':>10}"
    )
    lines = [head + f" {'second s':>9} {'pass s':>7}"]
    base = {r["layers"]: r for r in results if r["row"] == "inductor" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"{r['layers']:>6}  {r['row']:16} failed: {r['error'].strip().splitlines()[-1]}")
            continue
        ref = base.get(r["layers"])
        wall = r["first_call_s"] / ref["first_call_s"] if ref else float("nan")
        cpu = r["first_call_cpu_s"] / ref["first_call_cpu_s"] if ref else float("nan")
        pass_s = f"{r['pass_s']:7.3f}" if r["pass_s"] is not None else f"{'':7}"
        lines.append(
            f"{r['layers']:>6}  {r['row']:16} {r['first_call_s']:12.2f} {wall:10.3f} "
            f"{r['first_call_cpu_s']:8.2f} {cpu:10.3f} {r['second_call_s']:9.3f} {pass_s}"
        )
    return "\n".join(lines)


def phases(results: list[dict], top: int = 8) -> str:
    """Per layer count, the compile phases (Dynamo's timed functions) whose seconds differ most
    between an offload row and Inductor's: where the extra time goes."""
    lines = []
    base = {r["layers"]: r for r in results if r["row"] == "inductor" and "phases_s" in r}
    for r in results:
        ref = base.get(r["layers"])
        if r["row"] == "inductor" or ref is None or "phases_s" not in r:
            continue
        names = set(r["phases_s"]) | set(ref["phases_s"])
        diff = {n: r["phases_s"].get(n, 0.0) - ref["phases_s"].get(n, 0.0) for n in names}
        lines.append(f"{r['layers']} layers, {r['row']}, phase seconds against inductor:")
        for name in sorted(diff, key=lambda n: -abs(diff[n]))[:top]:
            theirs, ours = ref["phases_s"].get(name, 0.0), r["phases_s"].get(name, 0.0)
            lines.append(f"  {name:56} {theirs:8.2f} {ours:8.2f} {diff[name]:+8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[9, 18, 36, 72])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, metavar="ROW", help=f"of {ROWS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length of the timed call")
    parser.add_argument("--repeat", type=int, default=1, help="measure each row this many times (the min)")
    parser.add_argument("--json", default="bench_compile.json", help="where to write the results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one row, in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure(args.one, args.layers[0], device, args.mode, args.tokens)), flush=True)
        return
    results = []
    for layers in args.layers:
        runs = {row: [] for row in args.rows}
        for _ in range(args.repeat):  # rows interleaved, so that a drift of the machine shares out
            for row in args.rows:
                runs[row].append(run_fresh(row, layers, args))
                print(f"{layers} layers, {row}: {runs[row][-1].get('first_call_s', 'failed')}", flush=True)
        for tries in runs.values():
            good = [r for r in tries if "error" not in r]
            results.append(min(good, key=lambda r: r["first_call_s"]) if good else tries[-1])
    report = {
        "environment": {**environment(device), "mode": args.mode},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{report['environment']}\n{table(results)}\n\n{phases(results)}")


if __name__ == "__main__":
    main()
