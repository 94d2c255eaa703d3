"""A diffusion transformer's denoising step with its blocks in host memory: fx_offload against
diffusers' own group offloading, on the same model in one process.

The model is diffusers' Flux transformer (``examples/diffusers_offload.py`` builds it: real size by
default, 12B parameters in bf16, random weights; ``--tiny`` for a CPU check). Every ``--every``-th
block is offloaded (default: all 57). Rows:

* ``resident eager`` / ``compiled`` / ``reduce-overhead``: nothing offloaded; the eager row is the
  reference every other row's latents are compared with;
* ``fx_offload compiled`` / ``reduce-overhead``: the blocks offloaded with ``fx_offload.offload``,
  compiled with ``backend="offload_inductor"``;
* ``diffusers block stream`` / ``leaf stream``, ``eager`` / ``compiled``:
  ``diffusers.hooks.apply_group_offloading`` (what ``enable_group_offload`` calls) with
  ``use_stream=True``, block level (one block per group, over the whole model, diffusers' usual
  call) or leaf level (on the offloaded blocks), the compiled rows under plain ``torch.compile``.

Each row runs ``--steps`` Euler steps after two of warm-up (the compile), one step per call with a
sync after it; it reports the median time per step, the peak device memory, and the largest
difference of its final latents from the reference's (marked WRONG past 5% of the largest latent,
bf16's rounding across 4 steps staying well under it). The floor is ``max(resident reduce-overhead
step, offloaded bytes / pinned bandwidth)``.

    python benchmarks/bench_diffusers.py                          # every row (a GPU; split with --rows)
    python benchmarks/bench_diffusers.py --rows "resident eager" "resident reduce-overhead" \\
        "fx_offload reduce-overhead"
    python benchmarks/bench_diffusers.py --tiny --device cpu      # checks the code runs
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from bench_offload import bandwidth, environment  # noqa: E402
from diffusers_offload import FULL_TOKENS, TINY_TOKENS, block_patterns, denoise, flux, inputs  # noqa: E402

import fx_offload  # noqa: E402

ROWS = [
    "resident eager",
    "resident compiled",
    "resident reduce-overhead",
    "fx_offload compiled",
    "fx_offload reduce-overhead",
    "diffusers block stream eager",
    "diffusers block stream compiled",
    "diffusers leaf stream eager",
    "diffusers leaf stream compiled",
]
TOLERANCE = 0.05  # of the largest latent


def prepare(row: str, model, device: torch.device, every: int):
    """``row``'s offloading set up on ``model``; return the callable one step calls."""
    mode = "reduce-overhead" if row.endswith("reduce-overhead") else None
    if row.startswith("resident"):
        return model if row.endswith("eager") else torch.compile(model, mode=mode)
    if row.startswith("fx_offload"):
        fx_offload.offload(model, block_patterns(model, every), device=device)
        return torch.compile(model, backend="offload_inductor", mode=mode)
    if row.startswith("diffusers"):
        from diffusers.hooks import apply_group_offloading

        options = dict(
            onload_device=device, offload_device=torch.device("cpu"), use_stream=device.type == "cuda"
        )
        if " block " in row:
            if every != 1:
                raise ValueError("block level offloads whole stacks of blocks: run it with --every 1")
            apply_group_offloading(model, offload_type="block_level", num_blocks_per_group=1, **options)
        else:
            for name in block_patterns(model, every):
                apply_group_offloading(model.get_submodule(name), offload_type="leaf_level", **options)
        return torch.compile(model) if row.endswith("compiled") else model
    raise ValueError(f"unknown row {row!r}")


def measure(row: str, args, device: torch.device, dtype: torch.dtype, reference) -> tuple[dict, torch.Tensor]:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result: dict = {"row": row}
    latents = None
    model = flux(not args.tiny, device, dtype)
    step_inputs = inputs(model, not args.tiny, device, dtype, args.batch, args.image_tokens)
    try:
        fn = prepare(row, model, device, args.every)
        if device.type == "cuda":
            # after set-up (the model was built on the device), before the warm-up: under CUDA
            # graphs the warm-up allocates the graph's pool, which replays then reuse unseen
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        denoise(fn, step_inputs, 2, device)
        result["warmup_s"] = time.perf_counter() - start
        latents, seconds = denoise(fn, step_inputs, args.steps, device)
        result["step_ms"] = statistics.median(seconds) * 1e3
        result["steps_ms"] = [s * 1e3 for s in seconds]
        if device.type == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if reference is not None:
            result["max_abs_diff"] = (latents.float() - reference.float()).abs().max().item()
            result["relative_diff"] = result["max_abs_diff"] / reference.float().abs().max().item()
            result["correct"] = result["relative_diff"] <= TOLERANCE
    except Exception as error:  # a peer that fails is reported, not dropped
        result["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        if fx_offload.plan_of(model) is not None:
            fx_offload.restore(model)
        del model
    return result, latents


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['row']:32} failed: {r['error'][:140]}"
    mark = {True: "ok", False: "WRONG", None: "(reference)"}[r.get("correct")]
    ratio = f"{r['x_floor']:8.3f}" if "x_floor" in r else f"{'':8}"
    peak = f"{r['peak_gb']:7.2f}" if "peak_gb" in r else f"{'':7}"
    diff = f"{r['max_abs_diff']:10.3g}" if "max_abs_diff" in r else f"{'':10}"
    return f"{r['row']:32} {r['step_ms']:9.2f} {ratio} {peak} {diff} {r['warmup_s']:8.1f}  {mark}"


def table(report: dict) -> str:
    head = (
        f"{report['offloaded_blocks']} blocks offloaded ({report['offloaded_bytes'] / 1e9:.2f} GB), "
        f"batch {report['batch']}, {report['image_tokens']} image tokens"
    )
    if report["floor_ms"]:
        head += (
            f"; {report['pinned_bytes_per_s'] / 1e9:.1f} GB/s pinned, "
            f"transfer {report['transfer_ms']:.2f} ms, "
            f"floor {report['floor_ms']:.2f} ms"
        )
    columns = f"{'row':32} {'ms/step':>9} {'x floor':>8} {'peak GB':>7} {'max |diff|':>10} {'warmup s':>8}"
    return "\n".join([head, columns] + [line(r) for r in report["rows"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, metavar="ROW", help=f"of {ROWS}")
    parser.add_argument("--every", type=int, default=1, help="offload every k-th block (1: all)")
    parser.add_argument("--steps", type=int, default=4, help="timed denoising steps per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--image-tokens", type=int, default=None, help=f"default {FULL_TOKENS[0]} (1024x1024)"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny Flux (checks the code runs, any device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench_diffusers.json", help="where to write the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = ["resident eager"] + [r for r in args.rows if r != "resident eager"]  # the reference first
    model = flux(not args.tiny, torch.device("meta"), dtype)
    names = block_patterns(model, args.every)
    moved = sum(p.nbytes for name in names for p in model.get_submodule(name).parameters())
    gbps = bandwidth(device)
    transfer_ms = moved / gbps * 1e3 if gbps == gbps else None  # NaN off CUDA
    image_tokens = args.image_tokens or (TINY_TOKENS if args.tiny else FULL_TOKENS)[0]
    report = {
        "environment": {**environment(device)},
        "command": " ".join(["python", *sys.argv]),
        "model": "FluxTransformer2DModel" + (" (tiny)" if args.tiny else ""),
        "offloaded_blocks": len(names),
        "offloaded_bytes": moved,
        "batch": args.batch,
        "image_tokens": image_tokens,
        "pinned_bytes_per_s": gbps,
        "transfer_ms": transfer_ms,
        "floor_ms": None,
        "rows": [],
    }
    reference = None
    for row in rows:  # the JSON is written after every row: a run cut short keeps the rows it did
        result, latents = measure(row, args, device, dtype, reference)
        if row == "resident eager":
            reference = latents
        report["rows"].append(result)
        print(line(result), flush=True)
        timed = [r for r in report["rows"] if "step_ms" in r]
        best = next((r for r in timed if r["row"] == "resident reduce-overhead"), None)
        report["floor_ms"] = max(best["step_ms"], transfer_ms) if best and transfer_ms else None
        for r in report["rows"]:
            if report["floor_ms"] and "step_ms" in r:
                r["x_floor"] = r["step_ms"] / report["floor_ms"]
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("\n" + table(report))


if __name__ == "__main__":
    main()
