"""A diffusion transformer with its blocks in host memory: diffusers' Flux, offloaded and compiled.

Flux (``diffusers.FluxTransformer2DModel``: 19 double-stream and 38 single-stream blocks, 12B
parameters, 24 GB in bf16) is the transformer most often offloaded: a 24 GB card cannot hold it.
Built from its config with random weights, it fits an H200 whole, so the same process can run it
resident for reference. Its blocks (``--every k``: every k-th of them) are offloaded with
``fx_offload.offload``, the model compiled with ``backend="offload_inductor"``, and a few Euler
denoising steps run; the example prints the time per step, the peak device memory and the largest
difference from the same model without offload.

    python examples/diffusers_offload.py                       # tiny, on the CPU (a few seconds of compute)
    python examples/diffusers_offload.py --full                # the real size, on a GPU
    python examples/diffusers_offload.py --full --every 2 --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fx_offload

FULL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)  # fmt: skip
# (image tokens, text tokens): a 1024x1024 image is 64x64 latent patches; T5's 512 tokens
FULL_TOKENS, TINY_TOKENS = (4096, 512), (64, 8)


def flux(full: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Flux's transformer from its config, random weights (the same for the same seed)."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with device:
            model = FluxTransformer2DModel(**(FULL if full else TINY))
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def inputs(
    model, full: bool, device: torch.device, dtype: torch.dtype, batch: int = 1, image: int | None = None
):
    """One denoising step's inputs but the timestep (``denoise`` sets it): ``image`` latent tokens
    (a square number; default 4096 at the real size, a 1024x1024 image)."""
    config = model.config
    default, text = FULL_TOKENS if full else TINY_TOKENS
    image = image or default
    side = int(image**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    generator = torch.Generator().manual_seed(1)

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return dict(
        hidden_states=noise(batch, image, config.in_channels),
        encoder_hidden_states=noise(batch, text, config.joint_attention_dim),
        pooled_projections=noise(batch, config.pooled_projection_dim),
        img_ids=img_ids.reshape(image, 3).to(device, dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
    )


def block_patterns(model, every: int) -> list[str]:
    """Every ``every``-th block of both stacks (``every=1``: all of them)."""
    names = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
    return names[::every]


def denoise(model, step_inputs: dict, steps: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """``steps`` Euler steps of the flow from noise (t = 1) towards an image (t = 0); the final
    latents and the seconds each step took."""
    latents = step_inputs["hidden_states"]
    times, seconds = torch.linspace(1.0, 0.0, steps + 1), []
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            timestep = torch.full((latents.shape[0],), float(t), device=device, dtype=latents.dtype)
            kwargs = {**step_inputs, "hidden_states": latents, "timestep": timestep}
            velocity = model(**kwargs, return_dict=False)[0]
            latents = latents + (t_next - t) * velocity
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return latents, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Flux's real size (a GPU)")
    parser.add_argument("--every", type=int, default=1, help="offload every k-th block (1: all)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (after two of warm-up)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.full or torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = flux(args.full, device, dtype)
    step_inputs = inputs(model, args.full, device, dtype)
    expected, _ = denoise(model, step_inputs, args.steps, device)  # the model without offload

    plan = fx_offload.offload(model, block_patterns(model, args.every), device=device)
    print(plan)
    compiled = torch.compile(model, backend="offload_inductor", mode=args.mode)
    if device.type == "cuda":  # the warm-up counts: under CUDA graphs it allocates the graph's memory
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    denoise(compiled, step_inputs, 2, device)  # compiles
    print(f"compile and two warm-up steps: {time.perf_counter() - start:.1f} s")
    got, seconds = denoise(compiled, step_inputs, args.steps, device)
    peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB" if device.type == "cuda" else "n/a (CPU)"
    difference = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    median = statistics.median(seconds) * 1e3
    print(f"per step: {' '.join(f'{s * 1e3:.1f}' for s in seconds)} ms (median {median:.1f})")
    print(f"peak device memory: {peak}; offloaded: {plan.offloaded_bytes / 1e6:.1f} MB")
    print(f"max |difference| from the model without offload after {args.steps} steps: {difference:.3g}")
    print(f"(largest latent: {scale:.3g}); read outside compiled graphs: {plan.outside_graphs() or 'none'}")
    fx_offload.restore(model)


if __name__ == "__main__":
    main()
