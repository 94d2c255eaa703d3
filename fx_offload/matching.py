"""Which modules a pattern selects.

A pattern is one of:

* a bare name (``visual``, ``thinker.visual``): every module whose qualified name is that name
  or ends with ``.<name>``, at any depth;
* a glob (``layers.*.mlp``, ``audio_tower.*``): at any depth, like a bare name: it selects a
  module when ``fnmatch`` matches its qualified name or any dotted suffix of it
  (``layers.*.mlp`` selects ``model.layers.0.mlp``; ``*`` also crosses dots); a glob that ends
  in ``.*`` also selects the module it names (``audio_tower.*`` selects ``thinker.audio_tower``
  and its descendants);
* ``re:<regex>``: a regular expression that must match the whole qualified name.

A selected module brings all its descendants with it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

_GLOB_CHARS = set("*?[")


def normalize_patterns(patterns: object, *, argument: str = "patterns") -> tuple[str, ...]:
    """Check the user's patterns and return them as a tuple of strings.

    A mapping (pattern -> policy) contributes its keys. Raises ``TypeError`` or ``ValueError``
    naming the bad entry.
    """
    if isinstance(patterns, (bytes, bytearray)):
        raise TypeError(
            f"{argument} must be strings, got bytes {bytes(patterns)!r}; decode it, e.g. "
            f"[{bytes(patterns).decode(errors='replace')!r}]"
        )
    if isinstance(patterns, Iterator):
        raise TypeError(
            f"{argument} is a one-shot iterator ({type(patterns).__name__}), which would be read "
            f"once and then be empty; pass a list, e.g. list(...)"
        )
    if isinstance(patterns, str):
        patterns = [patterns]
    elif isinstance(patterns, Mapping):
        patterns = list(patterns.keys())
    if not isinstance(patterns, Iterable):
        raise TypeError(
            f"{argument} must be a list of strings such as ['visual', 'layers.*'], "
            f"got {type(patterns).__name__}"
        )
    result = []
    for pattern in patterns:
        if isinstance(pattern, (bytes, bytearray)):
            raise TypeError(
                f"{argument} must hold strings; got bytes {bytes(pattern)!r}; decode it, e.g. "
                f"{bytes(pattern).decode(errors='replace')!r}"
            )
        if not isinstance(pattern, str):
            raise TypeError(
                f"{argument} must hold strings; got {pattern!r} ({type(pattern).__name__}). "
                "Write module names as strings, e.g. 'visual' or 're:layers\\.\\d+'"
            )
        if not pattern.strip():
            raise ValueError(f"{argument} holds an empty pattern; remove it or name a module")
        if pattern.startswith("re:"):
            if not pattern[3:].strip():
                raise ValueError(
                    f"pattern {pattern!r} has an empty regular expression, which would select the "
                    "whole model; write one, e.g. 're:layers\\.[0-3]', or '*' for every module"
                )
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(
                    f"pattern {pattern!r} is not a valid regular expression ({error}); "
                    "escape dots and brackets, e.g. 're:layers\\.[0-3]'"
                ) from None
        result.append(pattern)
    if not result:
        raise ValueError(f"{argument} is empty: name at least one module to offload, e.g. ['visual']")
    return tuple(result)


POLICIES = ("stream", "swap")


def normalize_policies(patterns: object, policy: object, *, argument: str = "patterns") -> tuple[str, ...]:
    """The policy of each pattern of ``normalize_patterns(patterns)``, in the same order.

    ``patterns`` may map each pattern to its policy; then ``policy`` must be left at ``None``.
    """
    names = normalize_patterns(patterns, argument=argument)
    if isinstance(patterns, Mapping):
        if policy is not None:
            raise ValueError(
                f"{argument} is a mapping of pattern to policy, and policy={policy!r} was given too: "
                "give the policies in the mapping, or a list of patterns with policy="
            )
        policies = tuple(patterns[name] for name in names)
    else:
        policies = (POLICIES[0] if policy is None else policy,) * len(names)
    for name, chosen in zip(names, policies):
        if chosen not in POLICIES:
            where = (
                f"pattern {name!r} has policy {chosen!r}"
                if isinstance(patterns, Mapping)
                else (f"policy {chosen!r}")
            )
            raise ValueError(
                f"{where}; the policies are {', '.join(repr(p) for p in POLICIES)} ('stream': "
                "fetched for each call and released after it; 'swap': the whole module kept on "
                "the device until another swapped module needs the room)"
            )
    return policies


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether one pattern selects the module called ``name`` (its qualified name)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        parts = name.split(".")
        for suffix in (".".join(parts[i:]) for i in range(len(parts))):
            if (pattern.endswith(".*") and suffix == pattern[:-2]) or fnmatch.fnmatchcase(suffix, pattern):
                return True
        return False
    return name == pattern or name.endswith("." + pattern)


def select(patterns: Sequence[str], names: Iterable[str], *, strict: bool = True) -> dict[str, list[str]]:
    """Return, for each pattern, the names it selects, in the order given.

    With ``strict``, raises ``ValueError`` for a pattern that selects nothing, naming the
    closest names (off where a graph is one piece of a model, and a pattern may match elsewhere).
    """
    names = list(names)
    selected = {pattern: [n for n in names if pattern_matches(pattern, n)] for pattern in patterns}
    for pattern, hits in selected.items():
        if strict and not hits:
            raise ValueError(_no_match_message(pattern, names))
    return selected


def is_within(name: str, roots: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``roots`` or a descendant of one (``''`` is the model root)."""
    return any(root == "" or name == root or name.startswith(root + ".") for root in roots)


def prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``['a', 'a.b', 'a.b.c']``: the module and every module above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _no_match_message(pattern: str, names: list[str]) -> str:
    named = [n for n in names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in named})
    probe = pattern[3:] if pattern.startswith("re:") else pattern.rstrip(".*")
    candidates = list(dict.fromkeys(named + leaves))  # a top-level name is its own leaf: once
    close = difflib.get_close_matches(probe, candidates, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(named[:12]) + (", ..." if len(named) > 12 else "")
    return (
        f"no module matches {pattern!r}; {hint}modules: {shown}. "
        "List them all with [name for name, _ in model.named_modules()]"
    )
