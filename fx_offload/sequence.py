"""The order of compiled-graph calls, learned from forward to forward, and the next call guessed.

A model that Dynamo splits at graph breaks runs as a sequence of compiled-graph calls, and that
sequence repeats from forward to forward: the same graphs, in the same order, with the same
weights, including one graph that Dynamo reuses for every block of a stack (called once per block,
each time with that block's weights). A call is named by ``(graph, weights)``: the graph (a token,
``CallSequence.graph``) and a hashable identity of the offloaded weights the call passes (the
data pointers of those inputs, ``()`` for a call that passes none).

``CallSequence.arrive`` is told each call as it starts. It learns which call followed which and
guesses the next one (``CallSequence.next``), so the runtime can start copying the next graph's
first regions while this one computes, and across the gap between one forward's last call and the
next forward's first. A guess can be wrong (an input takes another path, another graph runs):
the consumer sees it (the call that arrives is not the one guessed, ``Origin.NOT_PREDICTED``) and
copies then; a wrong guess costs time, never correctness, because the consumer checks before it
uses what it prefetched.

The guess is keyed by where a call sits, not by the call alone: by the last call that passed
weights, how many calls without weights came since, and the call itself. A graph without offloaded
inputs that runs between the blocks of a stack (say, a rotary embedding recomputed per block) is
the same call every time; keyed by the block before it, each of its positions has one successor.
Where that key was never seen (a path change moved the count), the guess falls back to the call
that followed this call anywhere when a transition was last learned (a guess that came true
teaches nothing new).

Everything is O(1) per call (dict lookups, no scans) and bounded: each table keeps at most
``capacity`` entries (the oldest go first), a forward's record at most ``max_record`` calls, and
only the last ``kept`` forwards. Calls hold integers and the graph tokens only: a graph whose key
object dies (``graph(key)`` was given a weakly referenceable key) has its entries dropped, so
nothing here keeps a model, a compiled graph or a tensor alive.

No stream, event or FX node appears here: the runtime decides what to copy for a guess.
"""

from __future__ import annotations

import enum
import itertools
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple


class Call(NamedTuple):
    """One compiled-graph call: which graph, with which offloaded weights."""

    graph: Hashable
    weights: Hashable = ()


class Origin(enum.Enum):
    """Where the copy of a call's first regions was issued, given the guesses made before it."""

    SAME_GRAPH = "same graph"  # after the graph's own previous call (its refill)
    PREVIOUS_GRAPH = "previous graph"  # after the previous call, of another graph (its prefetch)
    BETWEEN_FORWARDS = "between forwards"  # after the previous forward's last call
    NOT_PREDICTED = "not predicted"  # no guess, or a wrong one: copied when the call started

    # members are singletons: hash by identity, in C (Enum's own hashes the name in Python, and
    # the runtime counts every call by its origin)
    __hash__ = object.__hash__


@dataclass
class Forward:
    """One forward as it ran: its calls, in order, each with where its copy was issued."""

    calls: list[Call] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    truncated: int = 0  # calls past ``max_record`` that were not recorded

    def counts(self) -> dict[Origin, int]:
        found = dict.fromkeys(Origin, 0)
        for origin in self.origins:
            found[origin] += 1
        return found

    def format(
        self, names: dict[Hashable, str] | None = None, weights_name: Callable[[tuple], str] | None = None
    ) -> str:
        """One line per call: position, graph (named by ``names`` where given), weights (named by
        ``weights_name`` where given), origin."""
        lines = []
        for i, (call, origin) in enumerate(zip(self.calls, self.origins)):
            graph = (names or {}).get(call.graph, call.graph)
            if not isinstance(call.weights, tuple):
                weights = call.weights
            else:
                weights = weights_name(call.weights) if weights_name else f"{len(call.weights)} weights"
            lines.append(f"{i:4d}  graph {graph}  {weights}  copy issued: {origin.value}")
        if self.truncated:
            lines.append(f"      ... {self.truncated} more calls")
        return "\n".join(lines)


class _Table:
    """A dict capped at ``capacity`` entries, dropping the least recently written."""

    __slots__ = ("data", "capacity")

    def __init__(self, capacity: int) -> None:
        self.data: dict = {}
        self.capacity = capacity

    def write(self, key, value) -> None:
        data = self.data
        if key in data:
            if data[key] == value:
                return  # a repeat: the common case, no reordering
            del data[key]
        elif len(data) >= self.capacity:
            del data[next(iter(data))]
        data[key] = value


class CallSequence:
    """Learns the order of a process's compiled-graph calls and guesses the next one.

    Args:
        capacity: entries per table (a transition per distinct call position); the sequences of
            all live models share them.
        max_record: calls recorded per forward (``forwards``); the prediction is not limited.
        kept: forwards whose record is kept (the one running, and the ones before it).
    """

    def __init__(self, capacity: int = 1 << 14, max_record: int = 1 << 12, kept: int = 2) -> None:
        if capacity < 1 or max_record < 0 or kept < 1:
            raise ValueError(
                f"CallSequence needs capacity >= 1, max_record >= 0 and kept >= 1, got capacity="
                f"{capacity}, max_record={max_record}, kept={kept}"
            )
        self._after = _Table(capacity)  # position of a call -> the call that followed it
        self._follows = _Table(capacity)  # a call -> the call that followed it, anywhere, when last learned
        self._tokens = itertools.count()
        self._max_record = max_record
        self._forwards: deque[Forward] = deque(maxlen=kept)
        self._anchor: Call | None = None  # the first call of a forward
        self._last: Call | None = None
        self._weighted: Call | None = None  # the last call that passed weights
        self._since = 0  # calls without weights since then
        self._position: tuple | None = None  # (weighted, since, last): the key of ``_after``
        self._next: Call | None = None
        self._placed = False  # ``_next`` was found by its position (not the fallback's)
        self._boundary = False  # begin_forward() was called: the next call starts a forward
        self._explicit = False  # the caller marks forwards: no anchor
        self._seen: set[Call] = set()  # the forward's calls with weights (up to ``max_record``)
        self._counts = dict.fromkeys(Origin, 0)

    # -- graph tokens -------------------------------------------------------------------------------

    def graph(self, key: object) -> int:
        """A token naming the compiled graph ``key`` stands for; when ``key`` dies (it must be weakly
        referenceable, as ``runtime.GraphRuntime`` is), every entry that names the token goes."""
        token = next(self._tokens)
        weakref.finalize(key, _forget_graph, weakref.ref(self), token)
        return token

    def forget(self, graph: Hashable) -> None:
        """Drop every entry that names ``graph`` (rare: a graph freed). O(entries)."""
        for table in (self._after, self._follows):
            table.data = {
                k: v for k, v in table.data.items() if v.graph != graph and graph not in _graphs_of(k)
            }
        for name in ("_anchor", "_last", "_weighted", "_next"):
            call = getattr(self, name)
            if call is not None and call.graph == graph:
                setattr(self, name, None)
        if self._position is not None and graph in _graphs_of(self._position):
            self._position = None

    # -- the hot path -------------------------------------------------------------------------------

    def arrive(
        self, graph: Hashable, weights: Hashable = (), held: bool = True, own: bool | None = None
    ) -> Origin:
        """Note that the call ``(graph, weights)`` starts; return where its first regions' copy was
        issued: ``NOT_PREDICTED`` where the caller says the bytes were not ``held`` (no copy was
        issued for this call, or a weight was written since). Where the caller knows which call
        issued the copy (``own``: the graph's own previous call, its refill; else another graph's,
        a prefetch), a held call is ``BETWEEN_FORWARDS`` if it starts a forward, else
        ``SAME_GRAPH`` or ``PREVIOUS_GRAPH`` by that; where it does not, those follow from the
        guess (``NOT_PREDICTED`` where the last guess was another call, or none) and the graph of
        the call before. Afterwards ``next`` is the guess for the call after this one."""
        last, guessed = self._last, self._next
        # the guessed call itself where it is the one that came (the runtime passes the weights'
        # interned tuple, so ``is`` holds): then the transitions that guessed it are known
        repeat = guessed is not None and guessed.weights is weights and guessed.graph == graph
        call = guessed if repeat else Call(graph, weights)
        again = bool(weights) and call in self._seen  # a call with weights, twice in one forward
        starts = self._boundary or (
            not self._explicit and (call == self._anchor or self._anchor is None or again)
        )
        if not held or (own is None and (guessed != call or last is None)):
            origin = Origin.NOT_PREDICTED
        elif starts:
            origin = Origin.BETWEEN_FORWARDS
        elif own if own is not None else last.graph == graph:
            origin = Origin.SAME_GRAPH
        else:
            origin = Origin.PREVIOUS_GRAPH
        self._counts[origin] += 1
        # learn: the position of the last call is followed by this call (known already where the
        # guess was this call and came from that position; the fallback table then keeps what it
        # learned when it last learned a position)
        if not (repeat and self._placed):
            if self._position is not None:
                self._after.write(self._position, call)
            if last is not None:
                self._follows.write(last, call)
        # record
        if starts:
            if self._anchor is None or again:
                self._anchor = call
            self._boundary = False
            self._forwards.append(Forward())
            self._seen = set()
        if weights and len(self._seen) < self._max_record:
            self._seen.add(call)
        forward = self._forwards[-1]
        if len(forward.calls) < self._max_record:
            forward.calls.append(call)
            forward.origins.append(origin)
        else:
            forward.truncated += 1
        # guess the next
        if weights:
            self._weighted, self._since = call, 0
        else:
            self._since += 1
        self._position = (self._weighted, self._since, call)
        self._last = call
        found = self._after.data.get(self._position)
        self._placed = found is not None
        self._next = found if found is not None else self._follows.data.get(call)
        return origin

    @property
    def next(self) -> Call | None:
        """The guess for the call after the latest one (None: nothing learned yet)."""
        return self._next

    def begin_forward(self) -> None:
        """Say that the next call starts a forward (where the caller knows; otherwise a forward
        starts whenever the first call of the last forward, the anchor, comes again, or a call with
        weights comes a second time in one forward, which becomes the anchor). Once called, only these
        calls start forwards."""
        self._boundary = self._explicit = True

    # -- what it learned ----------------------------------------------------------------------------

    @property
    def forwards(self) -> list[Forward]:
        """The kept forwards, oldest first; the last is the one running."""
        return list(self._forwards)

    @property
    def counts(self) -> dict[Origin, int]:
        """Calls per origin since this sequence was made."""
        return dict(self._counts)

    def entries(self) -> int:
        """Entries held in the tables (bounded by twice ``capacity``)."""
        return len(self._after.data) + len(self._follows.data)


def _graphs_of(position: object) -> tuple:
    if isinstance(position, Call):
        return (position.graph,)
    if isinstance(position, tuple):  # (weighted, since, last)
        return tuple(c.graph for c in position if isinstance(c, Call))
    return ()


def _forget_graph(sequence: weakref.ref, token: int) -> None:
    found = sequence()
    if found is not None:
        found.forget(token)
