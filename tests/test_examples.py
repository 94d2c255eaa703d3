"""The examples' output and help, as a newcomer meets them."""

import logging
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import qwen_omni  # noqa: E402


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("torch._dynamo.exc", logging.WARNING, __file__, 1, message, None, None)


def test_qwen_omni_holds_back_only_the_data_dependent_graph_break_warnings():
    breaks = qwen_omni.DataDependentBreaks()
    assert not breaks.filter(_record("Graph break from `Tensor.item()`, consider setting: ..."))
    assert not breaks.filter(_record("Backend compiler exception\n ... aten._local_scalar_dense.default ..."))
    assert breaks.filter(_record("Backend compiler exception\n  InductorError: ValueError: something else"))
    assert breaks.filter(_record("Recompiling function forward"))
    assert breaks.held == 2


def test_qwen_omni_table_lines_up_for_every_setting():
    rows = [
        dict(
            setting=name,
            device_weights_gb=None,
            peak_gb=1.5,
            ms=12.345,
            max_abs_diff=2e-7,
            graphs=42,
            swap_ins=s,
        )
        for name, s in [("resident", {}), ("towers stream, front end kept", {}), ("swap", {"visual": 3})]
    ]
    lines = qwen_omni.table(rows).splitlines()
    assert len(lines) == 4
    for column in ("weights GB", "peak GB", "graphs"):
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in lines[1:])


def test_vllm_example_help_explains_every_option():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "vllm_offload.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("\noptions:", 1)[1]
    for option in ("--arch", "--patterns"):
        # the option's block: its metavar, then its help, up to the next option
        block = options.split("\n  " + option, 1)[1].split("\n  -", 1)[0]
        assert len(block.split()) > 3, f"{option} has no help: {block!r}"
