"""Real multimodal architectures, tiny and random (transformers, no download): offloading a tower,
the language model, or part of a tower computes exactly what the model computes without offload.

Their towers break Dynamo graphs, and after a break one graph serves every layer of a kind, so
these also check that correctness does not depend on which layer a graph was traced for.
"""

import pytest
import torch

import fx_offload

transformers = pytest.importorskip("transformers")

VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56,
)  # fmt: skip
TEXT = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
IMAGE = dict(pixel_values_shape=(16, 3 * 2 * 14 * 14), image_grid_thw=[[1, 4, 4]], tokens=4)


def _qwen2_5_vl():
    config = transformers.Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config=VISION,
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 2, 252] + [250] * IMAGE["tokens"] + [253, 5, 6]])
    inputs = dict(
        input_ids=ids,
        pixel_values=torch.randn(IMAGE["pixel_values_shape"]),
        image_grid_thw=torch.tensor(IMAGE["image_grid_thw"]),
    )
    return model, inputs


def _qwen2_5_omni_thinker():
    config = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
            output_dim=64, n_window=8, max_source_positions=64,
        ),
        vision_config=VISION,
        text_config={**TEXT, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        audio_token_index=249, image_token_index=250, video_token_index=251, vision_start_token_id=252,
        vision_end_token_id=253, audio_start_token_id=247, audio_end_token_id=248,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    frames = 32
    audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = torch.tensor([[1, 252] + [250] * IMAGE["tokens"] + [253, 247] + [249] * audio_tokens + [248, 5]])
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(IMAGE["pixel_values_shape"]),
        image_grid_thw=torch.tensor(IMAGE["image_grid_thw"]),
        input_features=torch.randn(1, 16, frames),
        feature_attention_mask=torch.ones(1, frames, dtype=torch.long),
    )
    return model, inputs


CASES = [
    (_qwen2_5_vl, ["visual"]),
    (_qwen2_5_vl, ["language_model"]),
    (_qwen2_5_vl, ["visual", "language_model"]),
    (_qwen2_5_vl, ["re:.*visual\\.blocks\\.0"]),  # one block of a tower whose graph is reused
    (_qwen2_5_omni_thinker, ["visual"]),
    (_qwen2_5_omni_thinker, ["audio_tower"]),
    (_qwen2_5_omni_thinker, ["visual", "audio_tower", "model"]),
    (_qwen2_5_omni_thinker, ["re:audio_tower\\.layers\\.0"]),
]


IDS = [f"{build.__name__[1:]}-{'+'.join(patterns)}" for build, patterns in CASES]


@pytest.mark.parametrize(("build", "patterns"), CASES, ids=IDS)
def test_offloaded_towers_and_language_model_equal_the_model_without_offload(build, patterns):
    model, inputs = build()
    with torch.no_grad():
        expected = model(**inputs).logits
    plan = fx_offload.offload(model, patterns, device="cpu")
    try:
        with torch.no_grad():
            out = torch.compile(model, backend="offload_eager")(**inputs).logits
        assert plan.offloaded_bytes > 0
        assert torch.equal(out, expected)
    finally:
        fx_offload.restore(model)


POLICY_CASES = [
    (_qwen2_5_omni_thinker, {"visual": "stream", "audio_tower": "stream", "model": "swap"}),
    (_qwen2_5_omni_thinker, {"visual": "swap", "audio_tower": "swap"}),  # one tower at a time
    (_qwen2_5_vl, {"visual": "swap", "language_model": "swap"}),
]


@pytest.mark.parametrize(
    ("build", "patterns"), POLICY_CASES, ids=[f"{b.__name__[1:]}-{p}" for b, p in POLICY_CASES]
)
def test_policies_on_real_architectures_under_inductor_equal_inductor_without_offload(build, patterns):
    model, inputs = build()
    with torch.no_grad():
        eager = model(**inputs).logits
        plain = torch.compile(model, backend="inductor")(**inputs).logits
    torch._dynamo.reset()
    plan = fx_offload.offload(model, patterns, device="cpu")
    try:
        compiled = torch.compile(model, backend="offload_inductor")
        with torch.no_grad():
            outs = [compiled(**inputs).logits for _ in range(2)]
        for out in outs:
            assert torch.equal(out, plain)
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        assert all(c.swap_ins >= 1 for c in plan.components)
    finally:
        fx_offload.restore(model)
