"""Offload the towers of a Qwen2.5-Omni thinker; compare resident, stream and swap; then let a
thinker and a talker take turns on the device.

    python examples/qwen_omni.py            # tiny random thinker, CPU or GPU: 4-6 min on 2 CPU cores
    python examples/qwen_omni.py --full     # Qwen2.5-Omni-3B sizes, random weights: a GPU
    python examples/qwen_omni.py --full --part towers   # only the towers table (5-7 min on an H100)

The thinker is transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` built from a config
with random weights (no download). One forward reads an image, an audio clip and text. For each
setting it prints the weights on the device, the peak device memory of the forward, its latency
and the largest difference to the resident model's logits. The last part runs a thinker -> talker
loop (thinker once, talker for several steps, per request) with both stages ``swap``: each
stage's weights cross the bus once per switch, where ``stream`` moves them on every forward.

Most of the time goes to compiling: every setting compiles the model afresh, and transformers'
towers make dozens of graphs. Their code calls ``.item()`` on tensors (sequence lengths, grid
sizes), so Dynamo splits the graphs there, with or without fx_offload; the example counts
Dynamo's warnings about those splits and prints one line about them instead of each one
(``TORCH_LOGS=graph_breaks`` shows every break).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import fx_offload

VISION = {
    "tiny": dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=[1], window_size=56,
    ),
    # Qwen2.5-Omni-3B's vision tower (Qwen2.5-VL's ViT, merged to the 2048-wide language model)
    "full": dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
        fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
    ),
}  # fmt: skip
AUDIO = {
    "tiny": dict(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
        output_dim=64, n_window=8, max_source_positions=64,
    ),
    "full": dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
        num_mel_bins=128, output_dim=2048, n_window=100, max_source_positions=1500,
    ),
}  # fmt: skip
TEXT = {
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
    ),
    "full": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
        rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
    ),
}  # fmt: skip
# a talker-shaped second stage: a Qwen2 stack fed the thinker's hidden states
TALKER = {
    "tiny": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "full": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=8448),
}  # fmt: skip
# image patches (grid t, h, w), audio mel frames, text tokens
PROMPT = {"tiny": ((1, 4, 4), 32, 4), "full": ((1, 32, 32), 1000, 64)}
TOKENS = dict(
    audio=249, image=250, video=251, vision_start=252, vision_end=253, audio_start=247, audio_end=248
)


class Omni(nn.Module):
    """A thinker and a talker, the stages of Qwen2.5-Omni's generation."""

    def __init__(self, size: str) -> None:
        super().__init__()
        config = transformers.Qwen2_5OmniThinkerConfig(
            audio_config=AUDIO[size],
            vision_config=dict(VISION[size], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            text_config=TEXT[size],
            audio_token_index=TOKENS["audio"], image_token_index=TOKENS["image"],
            video_token_index=TOKENS["video"], vision_start_token_id=TOKENS["vision_start"],
            vision_end_token_id=TOKENS["vision_end"], audio_start_token_id=TOKENS["audio_start"],
            audio_end_token_id=TOKENS["audio_end"],
        )  # fmt: skip
        self.thinker = transformers.Qwen2_5OmniThinkerForConditionalGeneration(config)
        self.thinker_to_talker = nn.Linear(TEXT[size]["hidden_size"], TALKER[size]["hidden_size"])
        self.talker = transformers.Qwen2Model(transformers.Qwen2Config(**TALKER[size]))

    def think(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.thinker(**inputs, output_hidden_states=True)
        return out.logits, self.thinker_to_talker(out.hidden_states[-1])

    def talk(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.talker(inputs_embeds=embeds).last_hidden_state


def build(size: str, device: torch.device, dtype: torch.dtype) -> tuple[Omni, dict]:
    torch.manual_seed(0)
    with torch.device(device):
        model = Omni(size).to(dtype).eval()
    (t, h, w), frames, text = PROMPT[size]
    patches = t * h * w
    audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # tokens after the audio tower's two strides
    ids = [1, TOKENS["vision_start"], *[TOKENS["image"]] * (patches // 4), TOKENS["vision_end"]]
    ids += [TOKENS["audio_start"], *[TOKENS["audio"]] * audio, TOKENS["audio_end"]]
    ids += list(range(2, 2 + text))
    ids = torch.tensor([ids], device=device)
    mel = AUDIO[size]["num_mel_bins"]
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(patches, 3 * 2 * 14 * 14, device=device, dtype=dtype),
        image_grid_thw=torch.tensor([[t, h, w]], device=device),
        input_features=torch.randn(1, mel, frames, device=device, dtype=dtype),
        feature_attention_mask=torch.ones(1, frames, dtype=torch.long, device=device),
    )
    return model, inputs


class DataDependentBreaks(logging.Filter):
    """Counts, and keeps out of the output, Dynamo's warnings about the graph breaks at
    data-dependent ``.item()`` calls in transformers' code (plain Inductor prints the same
    warnings); every other record passes. A backend failure of another kind still shows."""

    LOGGERS = ("torch._dynamo.exc", "torch._dynamo.variables.tensor")

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        expected = message.startswith("Graph break from `Tensor.item()`") or (
            message.startswith("Backend compiler exception") and "aten._local_scalar_dense" in message
        )
        self.held += expected
        return not expected

    def __enter__(self) -> DataDependentBreaks:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def table(rows: list[dict]) -> str:
    """The settings' results, one line each, columns aligned whatever the settings' names."""
    width = max(len(row["setting"]) for row in rows)
    lines = [
        f"{'setting':{width}}  {'weights GB':>10}  {'peak GB':>7}  {'ms':>8}  {'max |diff|':>10}  "
        f"{'graphs':>6}  swap-ins"
    ]
    for row in rows:
        weights = f"{row['device_weights_gb']:.2f}" if row["device_weights_gb"] is not None else "-"
        peak = f"{row['peak_gb']:.2f}" if row["peak_gb"] is not None else "-"
        swap_ins = ", ".join(f"{name} {count}" for name, count in row["swap_ins"].items()) or "-"
        lines.append(
            f"{row['setting']:{width}}  {weights:>10}  {peak:>7}  {row['ms']:8.2f}  "
            f"{row['max_abs_diff']:10.2e}  {row['graphs']:6}  {swap_ins}"
        )
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run_setting(
    model, inputs, expected, device, name, patterns, runs, profile=False, **offload_kwargs
) -> dict:
    """Offload with ``patterns`` (None: resident), compile, time ``runs`` forwards, restore."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _sync(device)
    cuda = device.type == "cuda"
    plan = fx_offload.offload(model, patterns, device=device, **offload_kwargs) if patterns else None
    try:
        think = torch.compile(model.think, backend="offload_inductor" if plan else "inductor")
        weights = torch.cuda.memory_allocated(device) if cuda else None
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, _ = think(inputs)
        _sync(device)
        compile_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with torch.no_grad():
            for _ in range(runs):
                t0 = time.perf_counter()
                logits, _ = think(inputs)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            with torch.no_grad():
                profiler.enable()
                think(inputs)
                _sync(device)
                profiler.disable()
            print(f"== cProfile of one forward, {name}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        swap_ins = {c.name: c.swap_ins for c in plan.components} if plan else {}
        outside = set(plan.outside_graphs()) if plan else set()
        outside_bytes = sum(r.nbytes for r in plan.records if r.names[0] in outside) if plan else 0
        return {
            # offloaded parameters no compiled graph fetched: read in place by code Dynamo left
            # to Python (over the bus), or not read at all
            "outside_graphs": sorted(outside),
            "outside_graphs_mb": outside_bytes / 1e6,
            "setting": name,
            "patterns": patterns,
            "offloaded_gb": plan.offloaded_bytes / 1e9 if plan else 0.0,
            "device_weights_gb": weights / 1e9 if cuda else None,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            # head buffers held between calls (each graph's first regions)
            "persistent_gb": fx_offload.runtime.persistent_bytes() / 1e9,
            "ms": statistics.median(times),
            "first_call_s": compile_s,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "swap_ins": swap_ins,
            "max_abs_diff": (logits.float() - expected).abs().max().item(),
        }
    finally:
        if plan is not None:
            fx_offload.restore(model)


def alternate(model, inputs, device, policy: str, requests: int, steps: int) -> dict:
    """thinker once, talker ``steps`` times, per request; both stages under ``policy``."""
    torch._dynamo.reset()
    patterns = {"visual": "stream", "audio_tower": "stream", "thinker.model": policy, "talker": policy}
    if policy == "stream":
        patterns = list(patterns)
    plan = fx_offload.offload(model, patterns, device=device)
    try:
        think = torch.compile(model.think, backend="offload_inductor")
        talk = torch.compile(model.talk, backend="offload_inductor")
        before = fx_offload.runtime.copied_bytes
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(requests):
                _, embeds = think(inputs)
                for _ in range(steps):
                    embeds = embeds + talk(embeds)
        _sync(device)
        seconds = time.perf_counter() - t0
        stage_bytes = {"thinker.model": _bytes(model.thinker.model), "talker": _bytes(model.talker)}
        towers = _bytes(model.thinker.visual) + _bytes(model.thinker.audio_tower)
        return {
            "policy": policy,
            "requests": requests,
            "talker_steps": steps,
            "stage_gb": {k: v / 1e9 for k, v in stage_bytes.items()},
            # measured: every host -> device copy the calls issued, the first (compiling) ones too
            "crossed_gb": (fx_offload.runtime.copied_bytes - before) / 1e9,
            "towers_gb": towers / 1e9,
            "swap_ins": {c.name: c.swap_ins for c in plan.components},
            "seconds_with_compile": seconds,
        }
    finally:
        fx_offload.restore(model)


def _size(gb: float) -> str:
    return f"{gb:.3f} GB" if gb >= 0.1 else f"{gb * 1e3:.3f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="Qwen2.5-Omni-3B sizes (needs a GPU)")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per setting")
    parser.add_argument("--json", help="also write the results here (JSON)")
    parser.add_argument(
        "--part",
        choices=["all", "towers", "turns"],
        default="all",
        help="towers: the resident / stream / swap table; turns: the thinker -> talker loop (default: all)",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one forward each")
    args = parser.parse_args()
    size = "full" if args.full else "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, inputs = build(size, device, dtype)
    towers = {"visual": _bytes(model.thinker.visual), "audio_tower": _bytes(model.thinker.audio_tower)}
    print(
        f"{size} Qwen2.5-Omni thinker on {device} ({dtype}): visual {_size(towers['visual'] / 1e9)}, "
        f"audio_tower {_size(towers['audio_tower'] / 1e9)}, language model "
        f"{_size(_bytes(model.thinker.model) / 1e9)}; prompt {inputs['input_ids'].shape[1]} tokens"
    )
    with torch.no_grad():
        expected = model.think(inputs)[0].float()

    rows, turns = [], []
    settings = [
        ("resident", None, {}),
        ("towers stream", {"visual": "stream", "audio_tower": "stream"}, {}),
        # transformers' audio encoder runs its front end (convolutions) and projection where
        # Dynamo leaves the code to Python: offloaded, they are read over the bus. Keep them.
        ("towers stream, front end kept", {"visual": "stream", "audio_tower.layers": "stream"}, {}),
        ("towers swap, one at a time", {"visual": "swap", "audio_tower.layers": "swap"}, {}),
        ("towers swap, both fit", {"visual": "swap", "audio_tower.layers": "swap"},
         {"device_budget": sum(towers.values()) + (1 << 20)}),
    ]  # fmt: skip
    print(fx_offload.offload(model, settings[1][1], device=device))
    fx_offload.restore(model)
    parts = {"all": f"{len(settings)} settings, then the turns", "towers": f"{len(settings)} settings"}
    print(f"\ncompiling and timing {parts.get(args.part, 'the turns')}; each compiles the model afresh")
    with DataDependentBreaks() as breaks:
        if args.part in ("all", "towers"):
            rows = [
                run_setting(model, inputs, expected, device, n, p, args.runs, args.profile, **kw)
                for n, p, kw in settings
            ]
        if args.part in ("all", "turns"):
            turns = [
                alternate(model, inputs, device, policy, requests=3, steps=4) for policy in ("swap", "stream")
            ]
    if rows:
        print("\n" + table(rows))
        for row in rows:
            if row["outside_graphs"]:
                shown = ", ".join(row["outside_graphs"][:4]) + (
                    ", ..." if len(row["outside_graphs"]) > 4 else ""
                )
                print(
                    f"{row['setting']}: {len(row['outside_graphs'])} offloaded parameters "
                    f"({_size(row['outside_graphs_mb'] / 1e3)}) were read outside compiled graphs: {shown}"
                )
        if device.type == "cpu":
            print(
                "(on a CPU there is no device memory to measure, and ms is mostly the per-call "
                "overhead of a tiny model's many graphs)"
            )
    if turns:
        print("\nthinker -> talker, 3 requests of 1 thinker forward + 4 talker steps:")
        stage = turns[0]["stage_gb"]
        print(
            f"  stages: thinker.model {_size(stage['thinker.model'])}, talker {_size(stage['talker'])}; "
            f"the towers ({_size(turns[0]['towers_gb'])}) stream in both runs"
        )
    for turn in turns:
        swaps = f", swap-ins {turn['swap_ins']}" if turn["swap_ins"] else ""
        print(f"  {turn['policy']:6}: {_size(turn['crossed_gb'])} crossed the bus{swaps}")
    if breaks.held:
        print(
            f"\nnote: Dynamo split graphs at data-dependent .item() calls in transformers' Qwen2.5-Omni "
            f"code, as it does under plain Inductor; its {breaks.held} warnings about them were held back "
            "(TORCH_LOGS=graph_breaks shows every break)"
        )

    if args.json:
        report = {
            "environment": {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "size": size,
            "tower_gb": {k: v / 1e9 for k, v in towers.items()},
            "rows": rows,
            "turns": turns,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
