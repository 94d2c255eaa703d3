"""The learned order of compiled-graph calls (pure Python): what it guesses, what it records, what
it holds on to."""

import gc

import pytest

from fx_offload.runtime import GraphRuntime
from fx_offload.sequence import Call, CallSequence, Origin


def _run(sequence: CallSequence, calls: list[Call]) -> list[Origin]:
    return [sequence.arrive(*call) for call in calls]


def _tower(blocks: int = 4) -> list[Call]:
    """A tower split by graph breaks: an embedding graph, one graph reused for every block (with
    that block's weights) and a graph without offloaded weights between blocks, then a head."""
    calls = [Call("embed", (1,))]
    for i in range(blocks):
        calls += [Call("block", (100 + i, 200 + i)), Call("rotary", ())]
    return calls + [Call("head", (9,))]


def test_a_repeating_sequence_is_guessed_after_one_forward():
    sequence = CallSequence()
    calls = [Call("a", (1,)), Call("b", (2,)), Call("c", (3,))]
    first = _run(sequence, calls)
    assert first == [Origin.NOT_PREDICTED] * 3
    # the gap is learned when the second forward starts, guessed from the third on
    assert _run(sequence, calls) == [Origin.NOT_PREDICTED, Origin.PREVIOUS_GRAPH, Origin.PREVIOUS_GRAPH]
    third = _run(sequence, calls)
    # the first call of a forward was guessed after the last call of the one before
    assert third == [Origin.BETWEEN_FORWARDS, Origin.PREVIOUS_GRAPH, Origin.PREVIOUS_GRAPH]
    assert sequence.next == Call("a", (1,))
    assert [f.calls for f in sequence.forwards] == [calls, calls]  # the last two kept


def test_a_reused_graph_with_rotating_weights_is_guessed_block_by_block():
    sequence = CallSequence()
    calls = _tower()
    _run(sequence, calls)
    _run(sequence, calls)
    origins = _run(sequence, calls)
    assert Origin.NOT_PREDICTED not in origins
    # the block graph after the rotary graph: another graph; the head of each block's weights was
    # guessed from the position (the last weighted call and the count since), not the call alone
    assert origins[0] is Origin.BETWEEN_FORWARDS
    assert origins[1:3] == [Origin.PREVIOUS_GRAPH, Origin.PREVIOUS_GRAPH]
    for i, call in enumerate(calls[:-1]):
        sequence.arrive(*call)
        assert sequence.next == calls[i + 1]


def test_back_to_back_calls_of_one_graph_count_as_same_graph():
    sequence = CallSequence()
    calls = [Call("block", (i,)) for i in range(3)] + [Call("head", (9,))]
    _run(sequence, calls)
    _run(sequence, calls)
    assert _run(sequence, calls) == [
        Origin.BETWEEN_FORWARDS,
        Origin.SAME_GRAPH,
        Origin.SAME_GRAPH,
        Origin.PREVIOUS_GRAPH,
    ]


def test_a_path_change_is_a_wrong_guess_then_relearned():
    sequence = CallSequence()
    text = [Call("embed", (1,)), Call("layer", (2,)), Call("out", (3,))]
    image = [Call("embed", (1,)), Call("vision", (7,)), Call("layer", (2,)), Call("out", (3,))]
    _run(sequence, text)
    _run(sequence, text)
    _run(sequence, text)
    sequence.arrive(*image[0])
    assert sequence.next == Call("layer", (2,))  # the old path
    assert sequence.arrive(*image[1]) is Origin.NOT_PREDICTED  # the consumer sees the miss
    assert sequence.next is None  # a graph never seen: no guess
    _run(sequence, image[2:])
    _run(sequence, image)
    assert _run(sequence, image) == [Origin.BETWEEN_FORWARDS] + [Origin.PREVIOUS_GRAPH] * 3
    # and back: one miss where the paths part, none after
    assert _run(sequence, text).count(Origin.NOT_PREDICTED) == 1


def test_other_weights_in_a_reused_graph_are_a_wrong_guess():
    sequence = CallSequence()
    calls = [Call("block", (1,)), Call("block", (2,))]
    _run(sequence, calls)
    _run(sequence, calls)
    sequence.arrive(*calls[0])
    assert sequence.arrive("block", (3,)) is Origin.NOT_PREDICTED  # a weight replaced


def test_a_guess_the_consumer_could_not_serve_is_recorded_as_not_predicted():
    sequence = CallSequence()
    calls = [Call("a", (1,)), Call("b", (2,))]
    for _ in range(3):
        _run(sequence, calls)
    sequence.arrive(*calls[0])
    assert sequence.arrive(*calls[1], held=False) is Origin.NOT_PREDICTED  # written in place since
    assert sequence.next == calls[0]  # the order is still the one learned


def test_the_gap_between_forwards_is_guessed_and_recorded():
    sequence = CallSequence()
    calls = _tower(2)
    _run(sequence, calls)
    assert sequence.next is None  # nothing has ever followed the head
    _run(sequence, calls)
    assert sequence.next == calls[0]  # after the last call: the next forward's first
    third = _run(sequence, calls)
    assert third[0] is Origin.BETWEEN_FORWARDS
    last = sequence.forwards[-1]
    assert last.calls == calls and last.origins == third
    assert last.counts()[Origin.NOT_PREDICTED] == 0
    assert "copy issued: between forwards" in last.format().splitlines()[0]
    assert sequence.counts[Origin.BETWEEN_FORWARDS] == 1


def test_begin_forward_sets_the_boundary_where_the_anchor_repeats_inside_a_forward():
    sequence = CallSequence()
    calls = [Call("norm", ()), Call("a", (1,)), Call("norm", ()), Call("b", (2,))]
    for _ in range(3):
        sequence.begin_forward()
        origins = _run(sequence, calls)
    assert [len(f.calls) for f in sequence.forwards] == [4, 4]
    assert origins == [Origin.BETWEEN_FORWARDS] + [Origin.PREVIOUS_GRAPH] * 3


def test_tables_and_records_stay_within_their_caps():
    sequence = CallSequence(capacity=64, max_record=10, kept=2)
    for forward in range(50):
        _run(sequence, [Call("g", (forward, i)) for i in range(30)])
    assert sequence.entries() <= 128
    assert len(sequence.forwards) <= 2
    assert all(len(f.calls) <= 10 for f in sequence.forwards)


def test_a_dropped_graph_leaves_the_tables_and_is_not_kept_alive():
    sequence = CallSequence()
    key = GraphRuntime()
    token = sequence.graph(key)
    calls = [Call(token, (1,)), Call("kept", (2,)), Call("other", (3,))]
    for _ in range(3):
        _run(sequence, calls)
    held = sequence.entries()
    assert sequence.next == calls[0]
    del key  # the compiled graph goes; the sequence held only its token
    gc.collect()
    assert sequence.entries() == held - 4  # into and out of it, in both tables
    assert sequence.next is None
    # the model keeps running without that graph: the loop is learned again
    _run(sequence, calls[1:])
    assert _run(sequence, calls[1:]) == [Origin.BETWEEN_FORWARDS, Origin.PREVIOUS_GRAPH]


def test_bad_bounds_raise():
    with pytest.raises(ValueError, match="capacity >= 1"):
        CallSequence(capacity=0)


def test_a_sequence_met_after_another_model_finds_its_own_forwards():
    """The first call ever seen belonged to a model that no longer runs: a call with weights that
    comes twice in one forward starts the next one, so the new model's forwards are found."""
    sequence = CallSequence()
    _run(sequence, [Call("old", (1,)), Call("old", (2,))])
    calls = [Call("a", (3,)), Call("b", (4,)), Call("a", (5,))]
    for _ in range(3):
        origins = _run(sequence, calls)
    assert origins == [Origin.BETWEEN_FORWARDS, Origin.PREVIOUS_GRAPH, Origin.PREVIOUS_GRAPH]
    assert sequence.forwards[-1].calls == calls


def test_where_the_caller_says_which_call_issued_the_copy_that_names_the_origin():
    """A head refilled by its own graph's previous call is ``SAME_GRAPH`` even where another graph
    ran in between (the pieces of a block, each refilled with the next block's weights), one
    prefetched by the call before it ``PREVIOUS_GRAPH``, whatever the guess; a copy not held is
    ``NOT_PREDICTED``, and the first call of a forward ``BETWEEN_FORWARDS``."""
    sequence = CallSequence()
    sequence.begin_forward()
    assert sequence.arrive("a", (1,), True, True) is Origin.BETWEEN_FORWARDS
    assert sequence.arrive("b", (2,), True, True) is Origin.SAME_GRAPH  # nothing guessed yet
    assert sequence.arrive("a", (3,), True, False) is Origin.PREVIOUS_GRAPH
    assert sequence.arrive("b", (4,), False, True) is Origin.NOT_PREDICTED
    assert sequence.counts[Origin.SAME_GRAPH] == 1
