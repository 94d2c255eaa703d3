"""``TORCH_LOGS="+fx_offload"`` shows what the pass did to each graph; counters add it up."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from fx_offload import logs
from tests.models import HalvesStack, Stack, Tied, seeded

SCRIPT = """
import torch
import fx_offload
from tests.models import Stack, seeded

model = seeded(Stack, n=2)
fx_offload.offload(model, ["layers.*"], device="cpu")
with torch.no_grad():
    torch.compile(model, backend="offload_eager", options={"prefetch_head": 1})(torch.randn(2, 8))
"""


def _run_with_torch_logs(setting: str) -> str:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "TORCH_LOGS": setting,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torch_logs_shows_regions_bytes_window_and_graphs():
    """Two blocks of 1120 bytes (fc1 16x8 + 16, fc2 8x16 + 8, float32), one head: the first
    block (its buffers passed as the graph's inputs: no CUDA graphs here); the second fetched at
    the start."""
    out = _run_with_torch_logs("+fx_offload")
    assert (
        "window: prefetch=2, heads=1 for 2 regions of 1120 B, 1120 B (asked: prefetch=auto, prefetch_head=1)"
        in out
    ), out
    assert "rewrote a graph: 2 regions, 2240 B offloaded; prefetch=2, heads=1 passed as inputs" in out
    assert "layers.0      1120 B  head: copied in between calls, passed as the graph's inputs" in out
    assert "layers.1      1120 B  fetched at the start" in out
    before, _, after = out.partition("graph after the offload pass:")
    assert "graph before the offload pass:" in before and "torch.ops.fx_offload" not in before
    assert "torch.ops.fx_offload.fetch.default([arg5_1, arg6_1, arg7_1, arg8_1], [], 'layers.1')" in after


@pytest.mark.parametrize("passed", [True, False])
def test_counters_add_up_what_the_pass_built(offloaded, passed):
    counters.clear()
    model = seeded(Stack, n=3)
    offloaded(model, ["layers.*"])
    options = {"prefetch": 2, "prefetch_head": 1, "heads_as_inputs": passed}
    with torch.no_grad():
        torch.compile(model, backend="offload_eager", options=options)(torch.randn(2, 8))
    assert dict(counters["fx_offload"]) == {
        "graphs": 1,
        "regions": 3,
        "heads": 1,
        "head_bytes": 1120,
        "fetched_bytes": 2 * 1120,
        # passed as inputs, the head's buffers are refilled by the wrapper; else by a refill in
        # the graph, which on a CPU ('auto') copies all of the heads in the call
        "refills": 0 if passed else 1,
        "refill_in_graph_bytes": 0 if passed else 1120,
        "swapped": 0,
        "head_copy_not_predicted": 1,  # the runtime's: the first call's head was copied when it began
    }


def test_nothing_is_formatted_when_the_log_is_off(offloaded, monkeypatch):
    assert not logging.getLogger("fx_offload").isEnabledFor(logging.INFO)

    def refuse(gm):
        raise AssertionError("a graph was formatted for a log that is off")

    monkeypatch.setattr(logs, "_code", refuse)
    monkeypatch.setattr(logs, "_summary", refuse)
    model = seeded(Stack, n=2)
    offloaded(model, ["layers.*"])
    with torch.no_grad():
        torch.compile(model, backend="offload_eager")(torch.randn(2, 8))
    assert counters["fx_offload"]["graphs"] >= 1


@pytest.fixture
def fx_offload_logs():
    """Set logs in the test (so that their handler writes to the captured stderr); reset them after."""
    yield
    torch._logging.set_logs()


def _info_log(capsys, offloaded, model, patterns, x, options=None, **offload_kwargs) -> str:
    """What ``TORCH_LOGS="fx_offload"`` writes while ``model``, offloaded by ``patterns``, is compiled
    (``offload_eager``, ``options``) and called on ``x``."""
    torch._logging.set_logs(modules={"fx_offload": logging.INFO})
    offloaded(model, patterns, **offload_kwargs)
    with torch.no_grad():
        torch.compile(model, backend="offload_eager", options=options)(x)
    return capsys.readouterr().err


def test_set_logs_info_level_logs_regions_but_not_graphs(offloaded, fx_offload_logs, capsys):
    err = _info_log(capsys, offloaded, seeded(Stack, n=2), ["layers.*"], torch.randn(2, 8))
    assert "rewrote a graph: 2 regions, 2240 B offloaded" in err
    assert "graph before the offload pass" not in err and "graph after" not in err  # those are +fx_offload


def test_regions_are_logged_by_their_modules_names_in_the_model(offloaded, fx_offload_logs, capsys):
    """After a graph break Dynamo compiles a block's own forward, whose module names are relative
    to the block (``a``, ``b`` ...): the log names each region as the model does."""
    err = _info_log(capsys, offloaded, seeded(HalvesStack, n=3), ["layers.*"], torch.randn(2, 8))
    for name in ("a", "b", "c", "d"):
        assert re.search(rf"\]\s+layers\.0\.{name}\s+\d+ B", err), (name, err)
    # a tied weight is named as the module of the region that reads it
    options = {"prefetch_head": 1, "heads_as_inputs": False}
    err = _info_log(capsys, offloaded, seeded(Tied), ["*"], torch.randint(0, 16, (2, 5)), options)
    assert [m.group(1) for m in re.finditer(r"\]\s+(\w+)\s+\d+ B ", err)] == ["embed", "body", "lm_head"], err


def test_swapped_components_passed_as_inputs_are_logged_and_counted(offloaded, fx_offload_logs, capsys):
    """A graph that only reads its swapped components has no swap op, yet the log names them."""
    counters.clear()
    policies = {"layers.0": "swap", "layers.1": "swap", "layers.2": "stream"}
    model, x = seeded(Stack, n=3), torch.randn(2, 8)
    err = _info_log(capsys, offloaded, model, policies, x, device_budget=1 << 20)
    assert "1 regions, 1120 B offloaded" in err and "; 2 swapped components" in err, err
    assert "swapped component layers.0: 4 parameters, passed as inputs" in err, err
    assert counters["fx_offload"]["swapped"] == 2
