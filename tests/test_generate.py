"""transformers' generate() with offloaded decoder layers: the documented compile recipe (a static
cache, ``model.forward`` compiled under ``reduce-overhead``) with ``offload_inductor`` as the
backend gives the greedy tokens the same model gives without offload.

A generate compiles two graphs (the prompt's and the one-token step's), each reading the
offloaded layers' weights and updating the static cache in place. On a GPU, transformers also
compiles the one-token step by itself (``torch.compile(model.__call__)``, Inductor's backend), a
second compile around the compiled ``forward`` that this recipe does not want: pass
``disable_compile=True`` to generate() (``benchmarks/bench_generate.py`` does).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

TEXT = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
)  # fmt: skip
NEW_TOKENS = 6


def _model(name: str):
    config = getattr(transformers, f"{name}Config")(**TEXT)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def _generate(model, ids):
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
            disable_compile=True,
        )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("name", ["Qwen2", "Llama"])
def test_generate_with_offloaded_layers_gives_the_resident_tokens(name, offloaded):
    model = _model(name)
    ids = torch.randint(1, TEXT["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    expected = _generate(model, ids)

    plan = offloaded(model, ["model.layers.0", "model.layers.2"])
    model.forward = torch.compile(model.forward, backend="offload_inductor", mode="reduce-overhead")
    got = _generate(model, ids)

    assert got.tolist() == expected.tolist()
    assert plan.outside_graphs() == []  # every offloaded weight was fetched by a compiled graph
    assert len(set(expected.flatten().tolist())) > 1  # the tokens say something
