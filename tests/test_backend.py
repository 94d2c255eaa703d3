"""The backend as torch.compile users meet it: by name, with options, or alone."""

import importlib.metadata

import pytest
import torch

import fx_offload
from fx_offload import backend, placement
from fx_offload.explain import recording
from tests.models import Nested, Stack, seeded


def test_backends_are_registered_through_the_entry_point():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert names["offload_inductor"] == "fx_offload.backend:offload_inductor"
    assert "offload_inductor" in torch._dynamo.list_backends(exclude_tags=())


def test_backend_name_works_without_importing_fx_offload_first(tmp_path):
    import subprocess
    import sys

    script = (
        "import torch\n"
        "m = torch.nn.Linear(4, 4)\n"
        "try:\n"
        "    torch.compile(m, backend='offload_inductor')(torch.randn(2, 4))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    # the lookup found our backend: it refuses a model with nothing to offload, by our message
    assert "backend has nothing to offload" in done.stdout, done.stdout + done.stderr


def test_backend_alone_places_and_rewrites_at_first_compile():
    model = seeded(Nested)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    visual = [p for n, p in model.named_parameters() if n.startswith("thinker.visual.")]
    try:
        with recording() as graphs, torch.no_grad():
            out = torch.compile(model, backend="offload_eager", options={"offload": ["visual"]})(x)
        assert torch.equal(out, expected)
        assert all(placement.lookup(p) is not None for p in visual)
        assert placement.lookup(model.head.weight) is None
        assert "regions: thinker.visual" in graphs[0]
    finally:
        fx_offload.restore(model)
    assert all(placement.lookup(p) is None for p in visual)


def test_backend_alone_with_a_typo_names_the_pattern():
    model = seeded(Nested)
    typo = r"options\['offload'\]: no module matches 'visul'"
    with pytest.raises(fx_offload.OffloadOptionError, match=typo):
        torch.compile(model, backend="offload_eager", options={"offload": ["visul"]})(torch.randn(2, 8))


def test_the_backend_option_refuses_a_model_offload_placed(offloaded):
    """``options['offload']`` on a model ``fx_offload.offload`` placed raises (it would place more
    parameters than the model's plan lists); nothing is placed."""
    model = seeded(Nested)
    offloaded(model, ["visual"])
    with pytest.raises(fx_offload.OffloadOptionError, match=r"already offloaded .* fx_offload\.restore"):
        torch.compile(model, backend="offload_eager", options={"offload": ["head"]})(torch.randn(2, 8))
    assert placement.lookup(model.head.weight) is None


def test_nothing_to_offload_names_both_ways():
    model = seeded(Stack)
    with pytest.raises(Exception) as info:
        torch.compile(model, backend="offload_inductor")(torch.randn(2, 8))
    assert "fx_offload.offload(model, patterns)" in str(info.value)
    assert "options={'offload'" in str(info.value)


@pytest.mark.parametrize("prefetch", [-1, "2", 1.5, True])
def test_bad_prefetch_option_is_named(prefetch, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers"])
    with pytest.raises(Exception, match=r"options\['prefetch'\]"):
        torch.compile(model, backend="offload_eager", options={"prefetch": prefetch})(torch.randn(2, 8))


def test_unknown_option_is_refused_before_inductor_sees_it(offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers"])
    with pytest.raises(fx_offload.OffloadOptionError, match="no_such_option"):
        torch.compile(model, backend="offload_inductor", options={"no_such_option": 1})(torch.randn(2, 8))


def test_user_post_grad_pass_still_runs_before_ours(offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers"])
    seen = []

    def user_pass(graph):
        seen.append(sum(1 for n in graph.nodes if "fx_offload" in str(n.target)))

    with torch.no_grad():
        torch.compile(model, backend="offload_inductor", options={"post_grad_custom_post_pass": user_pass})(
            torch.randn(2, 8)
        )
    assert seen == [0]


def test_the_pass_cache_key_is_the_same_for_two_instances_of_a_model(offloaded):
    """Inductor's and AOTAutograd's caches key a graph by the pass's ``uuid``: it names the head
    regions by what stays the same across model instances and processes (their names and the
    positions of their weights), never by a module's identity."""
    with recording(lambda gm, plan, regions: plan) as plans:
        for _ in range(2):
            torch._dynamo.reset()
            model = seeded(Stack)
            offloaded(model, ["layers.*"])
            compiled = torch.compile(model, backend="offload_inductor", options={"prefetch_head": 1})
            with torch.no_grad():
                compiled(torch.randn(3, 8))
    assert plans[0].head_regions and plans[0] is not plans[1]
    assert backend.OffloadPass(plans[0]).uuid() == backend.OffloadPass(plans[1]).uuid()
