"""The backend's options as torch.compile users give them: each mistake is refused under our own
exception type, naming the option, unwrapped by Dynamo."""

import traceback

import pytest
import torch

from fx_offload import AUTO, OffloadOptionError, Options
from tests.models import Stack, seeded


def _compile_and_call(options):
    model = seeded(Stack, n=2)
    torch.compile(model, backend="offload_inductor", options=options)(torch.randn(2, 8))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefetch": -1}, r"options\['prefetch'\] must be an int >= 0 .* got -1"),
        ({"prefetch": "2"}, r"options\['prefetch'\] must be an int >= 0 .* got '2'"),
        ({"prefetch": 1.5}, r"options\['prefetch'\] must be an int >= 0"),
        ({"prefetch": True}, r"options\['prefetch'\] must be an int >= 0"),
        ({"prefetch": None}, r"options\['prefetch'\] must be an int >= 0 .* or 'auto', got None"),
        ({"prefetch_head": -1}, r"options\['prefetch_head'\] must be True, False, an int >= 0"),
        ({"prefetch_head": "one"}, r"options\['prefetch_head'\] must be .* got 'one'"),
        (
            {"prefetch": 1, "prefetch_head": 2},
            r"prefetch_head'\]=2 .*options\['prefetch'\]=1 .*Raise prefetch to 2",
        ),
        ({"refill_in_graph": -5}, r"options\['refill_in_graph'\] must be an int >= 0 .* got -5"),
        ({"refill_in_graph": 100, "prefetch_head": 0}, r"refill_in_graph'\]=100 .* leaves no head"),
        ({"refill_in_graph": 100, "prefetch": 1}, r"refill_in_graph'\]=100 .* leaves no head"),
        ({"heads_as_inputs": "yes"}, r"options\['heads_as_inputs'\] must be True .* got 'yes'"),
        ({"heads_as_inputs": True, "refill_in_graph": 100}, r"heads_as_inputs'\]=True .* drop one of"),
        ({"offload": []}, r"options\['offload'\] is empty"),
        ({"offload": [3]}, r"options\['offload'\] must hold strings"),
        ({"prefech": 2}, r"options\['prefech'\]=2 is not an option: did you mean fx_offload's 'prefetch'\?"),
        (
            {"prefetch_heads": 1},
            r"options\['prefetch_heads'\]=1 .* did you mean fx_offload's 'prefetch_head'\?",
        ),
        ({"refill_ingraph": 0}, r"did you mean fx_offload's 'refill_in_graph'\?"),
        ({"ofload": ["layers"]}, r"did you mean fx_offload's 'offload'\?"),
        ({"no_such_option": 1}, r"options\['no_such_option'\] is neither .* torch._inductor.config"),
        (
            {"max_autotun": True},
            r"options\['max_autotun'\] is neither .* Did you mean Inductor's 'max_autotune'\?",
        ),
        ({"triton.cudagraph": True}, r"Did you mean Inductor's 'triton.cudagraphs'\?"),
        ({"triton.cudagraphs": "yes"}, r"options\['triton.cudagraphs'\]='yes' .* takes a bool, not a str"),
    ],
)
def test_a_bad_option_is_refused_by_name_from_the_first_call(options, message):
    with pytest.raises(OffloadOptionError, match=message) as info:
        _compile_and_call(options)
    # unwrapped: not Dynamo's BackendCompilerFailed, with nothing about reporting a bug to PyTorch
    assert type(info.value) is OffloadOptionError
    assert isinstance(info.value, ValueError)
    assert "report" not in str(info.value)
    assert "BackendCompilerFailed" not in str(info.value)


def test_the_traceback_starts_at_the_backend():
    with pytest.raises(OffloadOptionError) as info:
        _compile_and_call({"prefech": 2})
    files = [frame.filename for frame in traceback.extract_tb(info.value.__traceback__)]
    functions = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "offload_inductor" in functions
    assert not any(name.endswith("output_graph.py") for name in files), files


def test_options_split_ours_from_inductors_and_normalize():
    options = Options.from_mapping(
        {
            "prefetch": 3,
            "prefetch_head": True,
            "offload": "visual",
            "triton.cudagraphs": False,
            "max-autotune": False,
        }
    )
    assert options.prefetch == 3
    assert options.prefetch_head == 1 and type(options.prefetch_head) is int
    assert options.refill_in_graph == AUTO
    assert options.offload == ("visual",)
    assert options.inductor == {"triton.cudagraphs": False, "max_autotune": False}
    assert Options(prefetch_head=False).prefetch_head == 0


def test_auto_is_the_default_and_its_one_spelling():
    assert AUTO == "auto"
    options = Options()
    assert (options.prefetch, options.prefetch_head, options.refill_in_graph) == (AUTO, AUTO, AUTO)
    assert Options.from_mapping(None) == options
    assert Options.from_mapping({"prefetch": "auto", "prefetch_head": "auto"}) == options


def test_options_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        Options(2)  # noqa
    with pytest.raises(AttributeError):
        Options().prefetch = 1


def test_options_outside_dynamo_raise_the_same_type():
    with pytest.raises(OffloadOptionError, match=r"options\['prefetch'\]"):
        Options(prefetch=-1)
    with pytest.raises(OffloadOptionError, match="did you mean fx_offload's 'prefetch'"):
        Options(inductor={"prefetc": 1})
    with pytest.raises(OffloadOptionError, match="options must be a dict"):
        Options.from_mapping([("prefetch", 1)])
