"""transformers' generate() with a quarter of the decoder layers in host memory: prefill and decode.

A 3B-size ``Qwen2ForCausalLM`` (hidden 2048, intermediate 11008, 36 layers, 16 query / 2 key-value
heads, bf16, random weights from a config) generates greedily with a static cache. Every 4th
decoder layer (``model.layers.0``, ``.4``, ...) is offloaded, the same layers for every row:

* ``resident``: nothing offloaded, ``model.forward`` compiled (Inductor, ``reduce-overhead``);
* ``fx_offload``: the layers offloaded with ``fx_offload.offload``, ``model.forward`` compiled with
  ``backend="offload_inductor"``, ``reduce-overhead`` (transformers' documented static-cache recipe);
* ``accelerate device_map``: the layers on ``"cpu"`` in a ``device_map`` (``accelerate.dispatch_model``:
  what ``from_pretrained(..., device_map=...)`` does), eager (transformers does not compile it);
* ``diffusers leaf stream``: ``diffusers.hooks.apply_group_offloading`` on each layer, leaf level, with
  a copy stream, eager;
* ``UVA in-place``: the layers' weights left in pinned host memory as device-typed views that kernels
  read over the bus (vLLM's ``--cpu-offload-gb``), compiled like ``resident``.

Each row keeps one static cache (``transformers.StaticCache``) across its generate() calls.
Prefill is the time of ``generate(max_new_tokens=1)`` (the prompt's forward and one sampled
token) from an idle device until its tokens are on the host: what a caller waits for. ``+ copies``
is the same call timed until the device is idle again, which also counts the copies fx_offload
issues after the forward for the next call (the heads, ``prefetch_head``). Decode per token is
``(generate(N) - generate(1)) / (N - 1)``, timed to the tokens. Each figure is the median of a few
runs after warm-up (compiles excluded). The floor of a row with offloaded weights is ``max(resident
time, offloaded bytes / pinned bandwidth)`` for prefill and for each decode step. ``before fw`` is
the part of prefill generate() spends before it calls the forward (host time in which only copies
issued before the call can run). ``--prefetch-head N`` sets the fx_offload row's ``prefetch_head``
(how many layers are copied in between calls); several values make a row for each, in one
process (``--prefetch-head auto 3``: ``fx_offload`` and ``fx_offload, prefetch_head=3``).
``prefill x`` and ``decode x`` are each figure over its floor (a CUDA device: none elsewhere),
``peak GB`` the device memory the row held at its peak (after its set-up), ``warmup s`` its first
two generate() calls (compiles and CUDA graph recordings), ``check`` how its tokens compare
(below).

Every row is checked against the resident model (the compiled rows against the compiled resident
row, the eager rows against the eager resident model): ``equal`` where it generates the same tokens;
``rounding`` where it parts from them at a step whose logits, and those of every step before it, lie
within the rounding tolerance of the reference's (compiled and eager bf16 kernels, and two compiles
of one model, round differently, and a near tie then picks another token); ``WRONG`` otherwise. The
tolerance is the larger of the compiled resident row's distance from the eager model and four bf16
epsilons of the largest logit.
A compiled row run without the resident row is ``unchecked``: four epsilons alone are tighter than
a compile's own rounding (the compiled resident model read 0.22–0.29 from eager at 3B size).

    python benchmarks/bench_generate.py                               # batch 1 and 8, every row (GPU)
    python benchmarks/bench_generate.py --batch 1 --rows resident fx_offload
    python benchmarks/bench_generate.py --tiny --device cpu           # a small model: checks the code runs

``--forward T`` times one forward of ``T`` tokens instead (no cache, ``logits_to_keep=1``), per call
with a sync after it and back to back (``bench_offload``'s timers), for the compiled rows:

    python benchmarks/bench_generate.py --forward 64 --layers 12 --rows resident fx_offload
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
from bench_offload import bandwidth, environment, time_back_to_back, time_forward, uva_views  # noqa: E402

import fx_offload  # noqa: E402

ROWS = ["resident", "fx_offload", "accelerate device_map", "diffusers leaf stream", "UVA in-place"]
CUDA_ONLY = {
    "accelerate device_map": "moves weights to a CUDA device per call",
    "UVA in-place": "pinned views",
}
COMPILED = {"resident", "fx_offload", "UVA in-place"}
FULL = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.2,
)  # fmt: skip
EVERY = 4


def config(args):
    from transformers import Qwen2Config

    sizes = dict(TINY if args.tiny else FULL)
    if args.layers is not None:
        sizes["num_hidden_layers"] = args.layers
    return Qwen2Config(**sizes, torch_dtype=args.dtype)


def offloaded_layers(layers: int) -> list[int]:
    return list(range(0, layers, EVERY))


def build(cfg, state: dict | None, device: torch.device, dtype: torch.dtype):
    """The model on ``device``, with ``state``'s weights where given (the same weights for every row)."""
    from transformers import Qwen2ForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with device:
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def random_state(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    model = build(cfg, None, device, dtype)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def offloaded_bytes(model, layers: list[int]) -> int:
    return sum(p.nbytes for i in layers for p in model.model.layers[i].parameters())


def prepare(row: str, model, device: torch.device, layers: list[int], prefetch_head: str = "auto"):
    """Set ``row``'s offloading up on ``model``; return the generate() keyword arguments it needs.
    ``prefetch_head``: the fx_offload row's option."""
    patterns = [f"model.layers.{i}" for i in layers]
    kwargs: dict = {"disable_compile": True}  # rows compile model.forward themselves, or run eager
    if row == "resident":
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    elif row == "fx_offload":
        fx_offload.offload(model, patterns, device=device)
        if prefetch_head == "auto":
            model.forward = torch.compile(model.forward, backend="offload_inductor", mode="reduce-overhead")
        else:  # torch.compile takes a mode or options: reduce-overhead's CUDA graphs as an option
            options = {"prefetch_head": int(prefetch_head), "triton.cudagraphs": True}
            model.forward = torch.compile(model.forward, backend="offload_inductor", options=options)
    elif row == "accelerate device_map":
        from accelerate import dispatch_model

        model.to("cpu")
        device_map = {"model.embed_tokens": device.index or 0, "model.norm": device.index or 0}
        device_map |= {"model.rotary_emb": device.index or 0, "lm_head": device.index or 0}
        for i in range(len(model.model.layers)):
            device_map[f"model.layers.{i}"] = "cpu" if i in layers else (device.index or 0)
        dispatch_model(model, device_map=device_map)
    elif row == "diffusers leaf stream":
        from diffusers.hooks import apply_group_offloading

        for i in layers:
            apply_group_offloading(
                model.model.layers[i],
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=device.type == "cuda",
            )
    elif row == "UVA in-place":
        for i in layers:
            uva_views(model.model.layers[i], device)
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    else:
        raise ValueError(f"unknown row {row!r}")
    return kwargs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def static_cache(cfg, batch: int, length: int, device: torch.device, dtype: torch.dtype):
    """One static cache for every generate() of a row, its tensors made outside any compiled code (so
    ``StaticCache`` marks their addresses static, as CUDA graphs need) and reset before each call (a
    new cache per call would give the compiled graphs new tensors each time)."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=length)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, dtype, device)
    return cache


def generate(model, ids, new_tokens: int, kwargs: dict, logits: bool = False):
    """The new tokens of a greedy generate(); with ``logits``, also each step's logits, on the host
    as (step, sequence, vocabulary)."""
    cache = kwargs.get("past_key_values")
    if cache is not None:
        cache.reset()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=logits,
            output_logits=logits,
            **kwargs,
        )
    if not logits:
        return out[:, ids.shape[1] :]
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits).float().cpu()


def distance(tokens: list, logits: torch.Tensor, reference: tuple[list, torch.Tensor]) -> float:
    """The largest |logit difference| from ``reference`` (its tokens and logits) over the steps each
    sequence shares with it: up to and including the first step where its token differs (whose
    input is still the same), every step where none does."""
    worst = 0.0
    for i, (mine, theirs) in enumerate(zip(tokens, reference[0])):
        last = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine) - 1)
        worst = max(worst, (logits[: last + 1, i] - reference[1][: last + 1, i]).abs().max().item())
    return worst


def check(rows: list[dict], logits: dict, references: dict, dtype: torch.dtype) -> None:
    """Mark each row ``equal``, ``rounding`` or ``WRONG`` against its reference (module doc)."""
    eager = references["resident eager"]
    compiled = logits.get("resident")
    scale = eager[1].abs().max().item()
    tolerance = 4 * torch.finfo(dtype).eps * scale
    if compiled is not None:
        tolerance = max(tolerance, distance(*compiled, eager))
    for r in rows:
        if r["row"] not in logits:
            continue
        tokens, values = logits[r["row"]]
        kind = r["row"].split(",")[0]  # (the fx_offload row with a prefetch_head of its own)
        if kind in COMPILED and kind != "resident" and compiled is None:
            r["check"] = "unchecked (no resident row)"  # eager's tolerance is too tight for a compile
            continue
        reference = compiled if kind in COMPILED else eager
        if r["row"] == "resident":
            reference = eager
        r["reference"] = "compiled resident" if reference is compiled else "eager resident"
        r["logits_max_diff"] = distance(tokens, values, reference)
        r["tolerance"] = tolerance
        if r["row"] == "resident" and compiled is not None:
            r["check"] = "reference"
        elif tokens == reference[0]:
            r["check"] = "equal"
        else:
            r["check"] = "rounding" if r["logits_max_diff"] <= tolerance else "WRONG"


def timed(model, ids, new_tokens: int, kwargs: dict, device: torch.device, runs: int) -> tuple[float, float]:
    """Median seconds of ``runs`` generate() calls of ``new_tokens`` tokens, each from an idle
    device: until its tokens are on the host, and until the device is idle again."""
    tokens, idle = [], []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        generate(model, ids, new_tokens, kwargs).cpu()
        tokens.append(time.perf_counter() - start)
        sync(device)
        idle.append(time.perf_counter() - start)
    return statistics.median(tokens), statistics.median(idle)


def before_forward(model, ids, kwargs: dict, device: torch.device, runs: int) -> float:
    """Median seconds that ``generate(max_new_tokens=1)`` spends before it calls the model's forward
    (cache reset, input preparation, logits processors): host time in which nothing is queued on
    the device yet, so no copy issued by the forward can overlap it."""
    starts: list[float] = []
    # a hook, not a wrapper of model.forward: generate() reads forward's signature to choose its
    # arguments, and other arguments would make Dynamo compile the forward again
    hook = model.register_forward_pre_hook(lambda module, args: starts.append(time.perf_counter()))
    try:
        times = []
        for _ in range(runs):
            sync(device)
            starts.clear()
            start = time.perf_counter()
            generate(model, ids, 1, kwargs)
            sync(device)
            times.append(starts[0] - start)
    finally:
        hook.remove()
    return statistics.median(times)


def measure(row: str, cfg, state, device, dtype, ids, args, logits: dict, head: str = "auto") -> dict:
    """One row's timings, peak and tokens; its tokens and logits go into ``logits``. ``head``: the
    fx_offload row's ``prefetch_head`` (a row of its own where it is not ``auto``)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result: dict = {"row": row if head == "auto" else f"{row}, prefetch_head={head}"}
    if device.type != "cuda" and row in CUDA_ONLY:
        return {**result, "skipped": f"needs CUDA ({CUDA_ONLY[row]})"}
    model = build(cfg, state, device, dtype)
    layers = offloaded_layers(cfg.num_hidden_layers)
    try:
        kwargs = prepare(row, model, device, layers, head)
        if device.type == "cuda":  # the model was built on the device: its peak is the whole model's
            torch.cuda.reset_peak_memory_stats(device)
        kwargs["past_key_values"] = static_cache(
            cfg, ids.shape[0], ids.shape[1] + args.new_tokens, device, dtype
        )
        start = time.perf_counter()
        tokens, values = generate(model, ids, args.new_tokens, kwargs, logits=True)  # compiles both graphs
        generate(model, ids, 1, kwargs)
        sync(device)
        result["warmup_s"] = time.perf_counter() - start
        prefill, prefill_idle = timed(model, ids, 1, kwargs, device, args.runs)
        whole, _ = timed(model, ids, args.new_tokens, kwargs, device, args.runs)
        result["prefill_ms"] = prefill * 1e3
        result["prefill_idle_ms"] = prefill_idle * 1e3
        result["prefill_before_forward_ms"] = before_forward(model, ids, kwargs, device, args.runs) * 1e3
        result["decode_ms_per_token"] = (whole - prefill) / (args.new_tokens - 1) * 1e3
        result["tokens"] = tokens.tolist()
        logits[result["row"]] = result["tokens"], values
        if device.type == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as error:  # a peer that fails is reported, not dropped
        result["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        if row == "fx_offload" and fx_offload.plan_of(model) is not None:
            fx_offload.restore(model)
        del model
    return result


def forward_case(batch: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    """One forward of ``args.forward`` tokens per call: ms per call and back to back, x the floor."""
    cfg = config(args)
    state = random_state(cfg, device, dtype)
    layers = offloaded_layers(cfg.num_hidden_layers)
    ids = torch.randint(
        1, cfg.vocab_size, (batch, args.forward), generator=torch.Generator().manual_seed(batch)
    )
    ids = ids.to(device)
    rows, reference = [], None
    for row in args.rows:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if row not in COMPILED:
            rows.append({"row": row, "skipped": "--forward times the compiled rows"})
            continue
        model = build(cfg, state, device, dtype)
        moved = offloaded_bytes(model, layers)
        result: dict = {"row": row}
        try:
            prepare(row, model, device, layers)

            def call(x, model=model):
                return model(input_ids=x, use_cache=False, logits_to_keep=1).logits

            result["per_call_ms"], _ = time_forward(call, ids, budget_s=2.0)
            result["back_to_back_ms"] = time_back_to_back(call, ids)
            with torch.no_grad():
                logits = call(ids).float()
            if reference is None and row == "resident":
                reference = logits
            if reference is not None:
                result["max_abs_diff"] = (logits - reference).abs().max().item()
        except Exception as error:
            result["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        finally:
            if fx_offload.plan_of(model) is not None:
                fx_offload.restore(model)
            del model
        rows.append(result)
        print(result, flush=True)
    gbps = bandwidth(device)
    resident = next((r for r in rows if r["row"] == "resident" and "per_call_ms" in r), None)
    if resident is not None and gbps == gbps:
        transfer_ms = moved / gbps * 1e3
        for r in rows:
            if "per_call_ms" in r and r["row"] != "resident":
                r["per_call_x_floor"] = r["per_call_ms"] / max(resident["per_call_ms"], transfer_ms)
                r["back_to_back_x_floor"] = r["back_to_back_ms"] / max(
                    resident["back_to_back_ms"], transfer_ms
                )
    else:
        transfer_ms = None
    return {"batch": batch, "forward_tokens": args.forward, "layers": cfg.num_hidden_layers,
            "offloaded_layers": layers, "offloaded_bytes": moved,
            "pinned_bytes_per_s": gbps if gbps == gbps else None, "transfer_ms": transfer_ms,
            "rows": rows}  # fmt: skip


def run(batch: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = config(args)
    state = random_state(cfg, device, dtype)
    ids = torch.randint(
        1, cfg.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch)
    )
    ids = ids.to(device)
    eager = build(cfg, state, device, dtype)  # the eager rows' reference, and the rounding tolerance's
    cache = static_cache(cfg, batch, args.prompt + args.new_tokens, device, dtype)
    kwargs = {"disable_compile": True, "past_key_values": cache}
    tokens, values = generate(eager, ids, args.new_tokens, kwargs, logits=True)
    references = {"resident eager": (tokens.tolist(), values)}
    moved = offloaded_bytes(eager, offloaded_layers(cfg.num_hidden_layers))
    del eager
    rows, logits = [], {}
    for row in args.rows:
        for head in args.prefetch_head if row == "fx_offload" else ["auto"]:
            rows.append(measure(row, cfg, state, device, dtype, ids, args, logits, head))
            print(line(rows[-1], None), flush=True)
    check(rows, logits, references, dtype)
    gbps = bandwidth(device)
    resident = next((r for r in rows if r["row"] == "resident" and "prefill_ms" in r), None)
    floor = {}
    if resident is not None and gbps == gbps:  # a CUDA device (NaN elsewhere)
        transfer_ms = moved / gbps * 1e3
        floor = {
            "prefill_ms": max(resident["prefill_ms"], transfer_ms),
            "decode_ms_per_token": max(resident["decode_ms_per_token"], transfer_ms),
            "transfer_ms": transfer_ms,
        }
    for r in rows:
        if floor and "prefill_ms" in r:
            r["prefill_x_floor"] = r["prefill_ms"] / floor["prefill_ms"]
            r["decode_x_floor"] = r["decode_ms_per_token"] / floor["decode_ms_per_token"]
    return {
        "batch": batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "layers": cfg.num_hidden_layers,
        "offloaded_layers": offloaded_layers(cfg.num_hidden_layers),
        "offloaded_bytes": moved,
        "pinned_bytes_per_s": gbps if gbps == gbps else None,  # (NaN off CUDA: not JSON)
        "floor": floor,
        "rows": rows,
    }


def line(r: dict, floor: dict | None) -> str:
    if "skipped" in r:
        return f"{r['row']:28} skipped: {r['skipped']}"
    if "error" in r:
        return f"{r['row']:28} failed: {r['error'][:140]}"
    mark = r.get("check", "")
    if mark in ("rounding", "WRONG"):
        mark += f" (logits {r['logits_max_diff']:.3g} from the {r['reference']}"
        mark += f", tolerance {r['tolerance']:.3g})"
    text = f"{r['row']:28} {r['prefill_ms']:10.2f} {r['prefill_idle_ms']:9.2f}"
    text += f" {r['prefill_before_forward_ms']:9.2f}"
    text += f" {r['decode_ms_per_token']:10.2f}"
    if "prefill_x_floor" in r:
        text += f" {r['prefill_x_floor']:9.3f} {r['decode_x_floor']:9.3f}"
    else:
        text += f" {'':9} {'':9}"
    peak = f"{r['peak_gb']:7.2f}" if "peak_gb" in r else f"{'':7}"
    return text + f" {peak} {r['warmup_s']:8.1f}  {mark}"


def table(result: dict) -> str:
    floor = result["floor"]
    head = (
        f"batch {result['batch']}, prompt {result['prompt']}, {result['new_tokens']} new tokens, "
        f"{len(result['offloaded_layers'])} of {result['layers']} layers offloaded "
        f"({result['offloaded_bytes'] / 1e9:.2f} GB)"
    )
    if floor:
        head += (
            f"; {result['pinned_bytes_per_s'] / 1e9:.1f} GB/s pinned, "
            f"transfer {floor['transfer_ms']:.2f} ms; "
            f"floor prefill {floor['prefill_ms']:.2f} ms, decode {floor['decode_ms_per_token']:.2f} ms/token"
        )
    columns = f"{'row':28} {'prefill ms':>10} {'+ copies':>9} {'before fw':>9} {'ms/token':>10}"
    columns += f" {'prefill x':>9} {'decode x':>9}"
    columns += f" {'peak GB':>7} {'warmup s':>8}  check"
    return "\n".join([head, columns] + [line(r, floor) for r in result["rows"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, metavar="ROW", help=f"of {ROWS}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 36; --tiny 8)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timed decode")
    parser.add_argument("--runs", type=int, default=3, help="timed generate() calls per figure (the median)")
    parser.add_argument(
        "--tiny", action="store_true", help="a small model (checks the code runs, any device)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forward", type=int, default=None, help="time one forward of this many tokens")
    parser.add_argument(
        "--prefetch-head",
        nargs="+",
        default=["auto"],
        help="the fx_offload row's prefetch_head option (auto, or regions); several: a row for each",
    )
    parser.add_argument("--json", default="bench_generate.json", help="where to write the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.dtype = dtype
    if args.tiny:
        args.prompt, args.new_tokens = min(args.prompt, 8), min(args.new_tokens, 4)
    if "resident" in args.rows:  # the reference first
        args.rows = ["resident"] + [r for r in args.rows if r != "resident"]
    results = []
    for batch in args.batch:
        if args.forward:
            results.append(forward_case(batch, args, device, dtype))
            print(json.dumps(results[-1], indent=1), flush=True)
            continue
        results.append(run(batch, args, device, dtype))
        print("\n" + table(results[-1]), flush=True)
    report = {
        "environment": {**environment(device)},
        "command": " ".join(["python", *sys.argv]),
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
