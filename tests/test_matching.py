import pytest
import torch

import fx_offload
from fx_offload.matching import normalize_patterns, pattern_matches
from tests.models import Nested, Stack, Tied, seeded


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("visual", "visual", True),
        ("visual", "thinker.visual", True),
        ("visual", "thinker.visual.proj", False),
        ("visual", "thinker.unvisual", False),
        ("thinker.visual", "model.thinker.visual", True),
        ("visual.*", "visual", True),
        ("visual.*", "visual.block.fc1", True),
        ("visual.*", "thinker.visual", True),
        ("visual.*", "thinker.visual.block.fc1", True),
        ("visual.*", "thinker.unvisual", False),
        ("visual.*", "thinker.visualx.proj", False),
        ("audio_tower.*", "thinker.audio_tower", True),
        ("layers.*.mlp", "model.layers.0.mlp", True),
        ("layers.*.mlp", "model.layers.0.mlp.up", False),
        ("layers.*.mlp", "model.sublayers.0.mlp", False),
        ("thinker.*.fc1", "model.thinker.visual.block.fc1", True),
        ("*", "", True),
        ("layers.*.fc1", "layers.3.fc1", True),
        ("layers.*.fc1", "layers.3.fc2", False),
        ("re:layers\\.[01]", "layers.1", True),
        ("re:layers\\.[01]", "layers.2", False),
        ("re:layers\\.[01]", "layers.10", False),
    ],
)
def test_pattern_rules(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


def _offloaded_names(plan):
    return sorted(name for record in plan.records for name in record.names)


def test_bare_name_matches_at_any_depth(offloaded):
    model = seeded(Nested)
    plan = offloaded(model, ["visual"])
    expected = sorted(n for n, _ in model.named_parameters() if n.startswith("thinker.visual."))
    assert _offloaded_names(plan) == expected
    assert [row.name for row in plan.modules] == ["thinker.visual"]


def test_glob_selects_each_layer(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, ["layers.*"])
    assert [row.name for row in plan.modules] == ["layers"]
    assert _offloaded_names(plan) == sorted(n for n, _ in model.named_parameters() if n.startswith("layers."))


def test_regex_selects_some_layers(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, ["re:layers\\.[02]"])
    assert [row.name for row in plan.modules] == ["layers.0", "layers.2"]
    assert all(name.startswith(("layers.0.", "layers.2.")) for name in _offloaded_names(plan))


def test_overlapping_patterns_count_each_parameter_once(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, ["layers", "layers.*", "layers.1.fc1"])
    names = _offloaded_names(plan)
    assert len(names) == len(set(names)) == 12


def test_tied_parameter_is_placed_once_with_both_names(offloaded):
    model = seeded(Tied)
    plan = offloaded(model, ["embed"])
    (record,) = plan.records
    assert record.names == ("embed.weight", "lm_head.weight")
    assert model.embed.weight is model.lm_head.weight


def test_no_match_names_pattern_closest_modules_and_how_to_list():
    model = seeded(Nested)
    with pytest.raises(ValueError) as info:
        fx_offload.offload(model, ["visul"], device="cpu")
    message = str(info.value)
    assert "'visul'" in message
    assert "did you mean 'visual'" in message or "'thinker.visual'" in message
    assert "named_modules()" in message


def test_no_match_suggests_each_name_once():
    model = seeded(Stack)  # "layers" is a top-level name and its own last part
    with pytest.raises(ValueError) as info:
        fx_offload.offload(model, ["layer"], device="cpu")
    hint = str(info.value).split("did you mean ")[1].split("?")[0]
    names = hint.split(", ")
    assert "'layers'" in names and len(names) == len(set(names)), hint


@pytest.mark.parametrize(
    ("patterns", "error", "words"),
    [
        ([], ValueError, "empty"),
        ([3], TypeError, "3"),
        (["re:layers.("], ValueError, "regular expression"),
        ([""], ValueError, "empty pattern"),
        (42, TypeError, "int"),
        (b"layers", TypeError, "bytes b'layers'.*'layers'"),
        ([b"layers"], TypeError, "bytes b'layers'.*'layers'"),
        (["re:"], ValueError, "empty regular expression"),
        (["re: "], ValueError, "empty regular expression"),
        ((p for p in ["layers"]), TypeError, "one-shot iterator.*list"),
    ],
)
def test_bad_patterns_raise_naming_the_input(patterns, error, words):
    with pytest.raises(error, match=words):
        normalize_patterns(patterns)


def test_plan_table_lists_modules_bytes_and_totals(offloaded):
    model = seeded(Nested)
    plan = offloaded(model, ["visual"])
    text = str(plan)
    visual_bytes = sum(p.numel() * 4 for p in model.thinker.visual.parameters())
    assert "thinker.visual" in text and "total offloaded" in text and "resident" in text
    assert plan.offloaded_bytes == visual_bytes
    assert f"{visual_bytes}" in text.replace(" B", "") or f"{visual_bytes / 1000:.2f} KB" in text
    resident = sum(p.numel() * 4 for n, p in model.named_parameters() if "visual" not in n)
    assert plan.resident_bytes == resident


def test_offload_twice_same_patterns_is_idempotent_other_patterns_raise(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, ["layers"])
    assert fx_offload.offload(model, ["layers"], device="cpu") is plan
    with pytest.raises(ValueError, match="restore"):
        fx_offload.offload(model, ["out"], device="cpu")


def test_pattern_selecting_modules_without_parameters_raises():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no parameters"):
        fx_offload.offload(model, ["1"], device="cpu")


def test_offload_accepts_a_generator_of_patterns(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, (name for name in ["layers.0", "out"]))
    assert plan.patterns == ("layers.0", "out")
    assert _offloaded_names(plan) == [
        f"layers.0.{n}" for n in ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")
    ] + ["out.weight"]


def test_an_empty_regex_offloads_nothing():
    model = seeded(Stack)
    with pytest.raises(ValueError, match="empty regular expression"):
        fx_offload.offload(model, ["re:"], device="cpu")
    assert fx_offload.plan_of(model) is None


def test_a_glob_selects_at_any_depth_like_a_bare_name(offloaded):
    model = seeded(Nested)
    plan = offloaded(model, ["visual.*"])
    assert _offloaded_names(plan) == sorted(
        f"thinker.visual.{n}" for n, _ in model.thinker.visual.named_parameters()
    )
