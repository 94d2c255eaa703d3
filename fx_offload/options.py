"""The backend's options: ``torch.compile(model, backend="offload_inductor", options={...})``.

``Options`` holds fx_offload's own options, validated when built, and the Inductor options the
same mapping carries. ``Options.from_mapping`` splits torch.compile's ``options`` into the two.

Errors are ``OffloadOptionError``: a ``ValueError`` whose message names the option, the value
and the fix. The backend first sees its options inside Dynamo, at the first call of the compiled
model (``torch.compile`` itself hands them over unread). Dynamo wraps what a backend raises in
``BackendCompilerFailed`` ("backend='offload_inductor' raised: ...") unless it is one of the
``ShortenTraceback`` exceptions, which it re-raises as they are (Inductor's ``TritonMissing``
relies on this): ``OffloadOptionError`` is one, so it reaches the user unwrapped, under its own
type, with the traceback cut to the backend's frames.
"""

from __future__ import annotations

import difflib
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch._dynamo.exc import ShortenTraceback

from fx_offload import matching

AUTO = "auto"  # chosen per graph: the one spelling of "not given" for every option that has a default rule

OURS = ("prefetch", "prefetch_head", "refill_in_graph", "heads_as_inputs", "offload")


class OffloadOptionError(ShortenTraceback, ValueError):
    """A bad option of fx_offload's backend, or a key that is no option at all."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)
        self.message = message

    def __str__(self) -> str:
        # Dynamo appends hints about its own internals to the arguments of exceptions passing
        # through it; they do not apply to a bad option
        return self.message


@dataclass(frozen=True, kw_only=True)
class Options:
    """fx_offload's options, and the Inductor options passed through.

    Attributes:
        prefetch: at most ``prefetch + 1`` regions' weights on the device at once, the heads among
            them (0: each region fetched just before it runs, one at a time). ``AUTO``:
            ``window.default_prefetch`` of the heads chosen.
        prefetch_head: how many of each graph's first regions (heads) are copied in between calls,
            into persistent buffers; ``True`` is 1, ``False`` 0. ``AUTO``: as many first regions as
            make ``HEAD_BYTES``, at most half the graph's regions and at most ``prefetch - 1``;
            but every region of a graph whose heads are passed as inputs and whose offloaded
            weights total at most ``HEAD_BYTES`` and lie in one block of a stack of alike blocks
            (``backend.one_block_of_a_stack``: a piece of a block Dynamo cut at a graph break
            and reuses for every block; no op is left in it; with ``prefetch`` ``AUTO`` too).
        refill_in_graph: of the heads' refill for the next call, the bytes a graph copies itself
            during its last compute; the wrapper copies the rest after the call. A part left after
            the call delays the next call's start where calls come back to back; a part past the
            last compute makes the call end late. ``AUTO``: as many bytes as that compute hides,
            estimated per graph (``estimate.tail_bytes``).
        heads_as_inputs: whether the compiled function's wrapper passes a head region's buffers
            to the graph as its inputs, in place of the parameters, where the graph allows it (no
            CUDA graphs, an inference graph, head weights only read):
            the graph then has no op for its heads (no ``head``, ``wait``, ``refill``, ``join``,
            ``release``), which saves their Python on every call, and the wrapper refills them
            whole after the call, none of it hidden behind the graph's last compute; a graph's
            passed heads are one set of buffers per device, checked, passed and refilled at once. ``AUTO``:
            on a CPU, and on a GPU where every region of the graph is a head (a graph Dynamo cut
            small: no compute after the heads to hide a refill behind). ``True``: wherever the
            graph allows (a ``refill_in_graph`` other than ``AUTO`` or 0 beside it raises: that
            is a part of the ops' refill); ``False``: never. Under ``AUTO`` such a
            ``refill_in_graph`` keeps the ops.
        offload: patterns (``matching``) whose modules' parameters the backend places at its first
            compile, as ``fx_offload.offload`` would; ``None``: the model was offloaded before.
        inductor: every other key of torch.compile's ``options``: Inductor config options (names
            of ``torch._inductor.config``, dotted for its sub-configs: ``triton.cudagraphs``).
    """

    prefetch: int | str = AUTO
    prefetch_head: int | bool | str = AUTO
    refill_in_graph: int | str = AUTO
    heads_as_inputs: bool | str = AUTO
    offload: tuple[str, ...] | None = None
    inductor: Mapping[str, object] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        prefetch = _count(
            "prefetch", self.prefetch, "at most prefetch + 1 regions' weights on the device at once"
        )
        head = self.prefetch_head
        if isinstance(head, bool):
            head = int(head)
        elif head != AUTO and (not isinstance(head, int) or head < 0):
            raise OffloadOptionError(
                "options['prefetch_head'] must be True, False, an int >= 0 (how many of each graph's "
                f"first regions are copied in during the previous call) or {AUTO!r}, got {head!r}"
            )
        if head != AUTO and prefetch != AUTO and head > prefetch:
            raise OffloadOptionError(
                f"options['prefetch_head']={head!r} asks for more head regions than "
                f"options['prefetch']={prefetch} leaves room for: the heads count among the prefetch + 1 "
                f"regions on the device, beside the one computing. Raise prefetch to {head} or more, "
                "or lower prefetch_head"
            )
        in_graph = _count(
            "refill_in_graph",
            self.refill_in_graph,
            "bytes of the heads' refill a graph copies during its last compute, the rest after the "
            f"call; {AUTO!r}: as many as that compute hides, estimated",
        )
        headless = head == 0 or (head == AUTO and prefetch != AUTO and prefetch < 2)
        if in_graph != AUTO and in_graph > 0 and headless:
            raise OffloadOptionError(
                f"options['refill_in_graph']={in_graph} splits the refill of head regions, but "
                f"prefetch_head={self.prefetch_head!r} with prefetch={prefetch!r} leaves no head. Give "
                "prefetch_head >= 1 (and prefetch >= prefetch_head), or drop refill_in_graph"
            )
        if not isinstance(self.heads_as_inputs, bool) and self.heads_as_inputs != AUTO:
            raise OffloadOptionError(
                "options['heads_as_inputs'] must be True (the wrapper passes head buffers as the graph's "
                f"inputs where it can), False (always the graph's ops) or {AUTO!r}, got "
                f"{self.heads_as_inputs!r}"
            )
        if self.heads_as_inputs is True and in_graph != AUTO and in_graph > 0:
            raise OffloadOptionError(
                f"options['heads_as_inputs']=True passes the heads' buffers as the graph's inputs and "
                f"refills them after the call, but options['refill_in_graph']={in_graph} asks the graph "
                "to copy part of that refill itself: drop one of the two"
            )
        patterns = self.offload
        if patterns is not None:
            try:
                patterns = matching.normalize_patterns(patterns, argument="options['offload']")
            except (TypeError, ValueError) as error:
                raise OffloadOptionError(str(error)) from None
        object.__setattr__(self, "prefetch_head", head)
        object.__setattr__(self, "offload", patterns)
        object.__setattr__(self, "inductor", _inductor_options(self.inductor))

    @classmethod
    def from_mapping(cls, options: Mapping[str, object] | None) -> Options:
        """Split torch.compile's ``options`` into fx_offload's options and Inductor's, and check both."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise OffloadOptionError(
                f"options must be a dict such as {{'prefetch': 2}}, got {type(options).__name__}"
            )
        ours = {key: value for key, value in options.items() if key in OURS}
        inductor = {key: value for key, value in options.items() if key not in OURS}
        try:
            return cls(**ours, inductor=inductor)
        except OffloadOptionError as error:
            # where Dynamo shows the traceback from: the backend that passed the options
            error.first_useful_frame = sys._getframe(1)
            raise


def _count(name: str, value: object, meaning: str) -> int | str:
    if isinstance(value, str) and value == AUTO:
        return AUTO
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OffloadOptionError(
            f"options[{name!r}] must be an int >= 0 ({meaning}) or {AUTO!r}, got {value!r}"
        )
    return value


def _inductor_options(options: Mapping[str, object]) -> dict[str, object]:
    """``options`` checked against Inductor's config: each key one of its names, each value its type."""
    if not options:
        return {}
    import torch._inductor.config as config

    known = config.get_config_copy()
    checked: dict[str, object] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise OffloadOptionError(f"options keys must be strings, got {key!r}")
        name = key.replace("-", "_")  # as torch.compile's Inductor options accept them
        if name not in known:
            raise OffloadOptionError(_unknown(key, value, known))
        expected = config.get_type(name)
        if (
            typing.get_origin(expected) is None
            and isinstance(expected, type)
            and not isinstance(value, expected)
        ):
            raise OffloadOptionError(
                f"options[{key!r}]={value!r} is Inductor's config option {name!r}, which takes a "
                f"{expected.__name__}, not a {type(value).__name__}"
            )
        checked[name] = value
    return checked


def _unknown(key: str, value: object, known: Mapping[str, object]) -> str:
    ours = difflib.get_close_matches(key, OURS, n=1, cutoff=0.75)
    if ours:
        return (
            f"options[{key!r}]={value!r} is not an option: did you mean fx_offload's {ours[0]!r}? "
            f"fx_offload's options are {', '.join(OURS)}"
        )
    theirs = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
    hint = f" Did you mean Inductor's {theirs[0]!r}?" if theirs else ""
    return (
        f"options[{key!r}] is neither an fx_offload option ({', '.join(OURS)}) nor an Inductor config "
        "option (the names in torch._inductor.config, dotted for its sub-configs such as "
        f"'triton.cudagraphs'; torch._inductor.list_options() lists them).{hint}"
    )
