"""The window: at most ``prefetch + 1`` regions' weights on the device during a call, the heads
(first regions, copied in between calls) among them; and how the defaults choose both per graph."""

import weakref

import pytest
import torch

from fx_offload import backend, runtime
from fx_offload.options import AUTO
from tests.models import Stack, seeded

MiB = 1 << 20


@pytest.mark.parametrize(
    ("sizes", "prefetch", "head", "expected"),
    [
        ([537 * MiB] * 8, AUTO, AUTO, (2, 1)),  # large regions: one head, one region computing, one copying
        ([16 * MiB] * 8, AUTO, AUTO, (4, 3)),  # small ones: heads up to 48 MiB, two regions beside them
        ([16 * MiB] * 2, AUTO, AUTO, (2, 1)),  # at most half the regions are heads
        ([1 * MiB] * 5, AUTO, AUTO, (3, 2)),
        ([1 * MiB], AUTO, AUTO, (2, 1)),
        ([1 * MiB] * 100, AUTO, AUTO, (49, 48)),
        ([16 * MiB] * 8, 2, AUTO, (2, 1)),  # a given prefetch leaves room for one region to copy
        ([16 * MiB] * 8, 1, AUTO, (1, 0)),
        ([16 * MiB] * 8, 0, AUTO, (0, 0)),
        ([16 * MiB] * 8, AUTO, 0, (2, 0)),  # no head: three regions fetched in the call, as before
        ([16 * MiB] * 8, AUTO, 5, (6, 5)),
        ([16 * MiB] * 2, 4, 3, (4, 2)),  # never more heads than regions
        ([], AUTO, AUTO, (2, 0)),  # no region, or a graph whose heads would cross a partition
    ],
)
def test_window_chooses_heads_by_bytes_and_counts_them_in_prefetch(sizes, prefetch, head, expected):
    assert backend.window(sizes, prefetch, head) == expected


def test_more_heads_than_prefetch_allows_is_refused_naming_both(offloaded):
    model = seeded(Stack, n=4)
    offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend="offload_eager", options={"prefetch": 1, "prefetch_head": 2})
    with pytest.raises(Exception, match=r"prefetch_head'\]=2.*prefetch'\]=1.*Raise prefetch to 2"):
        with torch.no_grad():
            compiled(torch.randn(2, 8))


def _most_regions_held(model, monkeypatch, **options) -> tuple[int, int]:
    """Run two calls; return the most regions whose weights were on the device at once (fetched
    buffers still referenced, plus the head buffers) and the heads' share of that."""
    block = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    alive: list[list[weakref.ref]] = []
    most = [0, 0]
    original = runtime.fetch

    def fetch(weights, region=""):
        buffers = original(weights, region)
        alive.append([weakref.ref(b) for b in buffers])
        heads = runtime.persistent_bytes() // block
        held = sum(any(ref() is not None for ref in refs) for refs in alive) + heads
        if held > most[0]:
            most[:] = [held, heads]
        return buffers

    monkeypatch.setattr(runtime, "fetch", fetch)
    compiled = torch.compile(model, backend="offload_eager", options=options)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = compiled(x)
        torch.testing.assert_close(compiled(x), expected)
    return most[0], most[1]


@pytest.mark.parametrize(("prefetch", "head"), [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (3, 3)])
def test_at_most_prefetch_plus_one_regions_are_held_heads_included(prefetch, head, offloaded, monkeypatch):
    """Eight blocks, every region the same size: the fetched regions still referenced when a fetch
    allocates, plus the heads, never exceed prefetch + 1 and reach it (the window is used)."""
    model = seeded(Stack, n=8)
    offloaded(model, ["layers.*"])
    held, heads = _most_regions_held(model, monkeypatch, prefetch=prefetch, prefetch_head=head)
    assert heads == head
    assert held == prefetch + 1 or (head == prefetch and held == head)  # all heads: nothing fetched
