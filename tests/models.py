"""Small models shared by the tests: each exercises one shape of offload."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.block = Block(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.tanh(self.proj(x)))


class Nested(nn.Module):
    """A thinker holding a ``visual`` tower, beside a resident head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.thinker = nn.Module()
        self.thinker.visual = Tower(dim)
        self.thinker.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.thinker.norm(self.thinker.visual(x)))


class Stack(nn.Module):
    def __init__(self, n: int = 3, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(dim, hidden) for _ in range(n)])
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class CalledTwice(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.shared = nn.Linear(dim, dim)
        self.mid = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.mid(self.shared(x)))


class Tied(nn.Module):
    """An embedding whose weight is also the output head's."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.body(self.embed(ids))))


class Broken(nn.Module):
    """A graph break between two offloaded blocks."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.first = Block(dim)
        self.second = Block(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


class CpuHop(nn.Module):
    """Two offloaded blocks with a trip through host memory between them."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.first = Block(dim, hidden)
        self.second = Block(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        x = (x.cpu() * 2).to(x.device)
        return self.second(x)


def seeded(cls, *args, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return cls(*args, **kwargs).eval()


class BreakingBlock(Block):
    """A block whose forward breaks the graph: Dynamo compiles it once and reuses it per block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return x + self.fc2(h)


class _BlockStack(nn.Module):
    """``n`` blocks of class ``block`` (of width ``dim``), run in turn."""

    block: type[nn.Module]

    def __init__(self, n: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([self.block(dim) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class BreakingStack(_BlockStack):
    block = BreakingBlock


class HalvesBlock(nn.Module):
    """Two regions on each side of a graph break (a norm and an MLP, say): Dynamo compiles each
    half once and reuses it for every block of a stack."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        torch._dynamo.graph_break()
        return x + self.d(torch.relu(self.c(h)))


class HalvesStack(_BlockStack):
    block = HalvesBlock


class TwoStage(nn.Module):
    """Shaped like thinker -> talker: a stage that reads the input, then one that decodes from it.

    Each stage is compiled on its own and called in turn: the thinker once, the talker for a few
    steps, then the thinker again (the next request).
    """

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.thinker = Stack(2, dim, hidden)
        self.thinker.visual = Tower(dim)
        self.talker = Stack(2, dim, hidden)

    def think(self, x: torch.Tensor) -> torch.Tensor:
        return self.thinker(self.thinker.visual(x))

    def talk(self, h: torch.Tensor) -> torch.Tensor:
        return self.talker(h)


class RecordingLinear(nn.Linear):
    """Notes the weight tensor each forward computes with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.weight.data)
        return super().forward(x)


class EagerFrontEnd(nn.Module):
    """An offloaded module called from a frame Dynamo leaves to Python (like transformers' audio
    encoder, whose forward breaks the graph inside a loop), then a compiled block."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.front = RecordingLinear(dim, dim)
        self.front.seen = []
        self.block = Block(dim)

    @torch._dynamo.disable
    def _front(self, x: torch.Tensor) -> torch.Tensor:
        return self.front(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self._front(x))


class SelfWritingBody(nn.Module):
    """Writes its own parameters in place inside forward: a scale that doubles per call and a
    weight clamped WGAN-style."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(2)
            self.fc.weight.clamp_(-0.2, 0.2)
        return self.fc(x) * self.scale


class SelfWriting(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = SelfWritingBody(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.body(x)))


class Normed(nn.Module):
    """Linear layers around a BatchNorm, whose running statistics are buffers."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Linear(dim, dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class SideResultBlock(nn.Module):
    """A scaled input read twice: by an elementwise op whose result leaves the block (Inductor
    inlines the scaling, a read of ``scale``, into that op's kernel, which it may fuse with the
    op that uses it after the block) and by a linear layer."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = x * self.scale
        gate = torch.sigmoid(scaled)
        return gate, torch.relu(self.fc(scaled))


class LazyReads(nn.Module):
    """Blocks whose elementwise side result is used after the block."""

    def __init__(self, n: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SideResultBlock(dim) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            gate, h = block(x)
            x = h * gate + x
        return x


class BmmBlock(nn.Module):
    """A batched matmul of one row (Inductor lowers it on the CPU to an elementwise multiply and a
    sum, so its read of ``w`` can be inlined into any consumer), read again after the block."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, dim))
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.bmm(x, self.w)
        return self.fc(p.cos()), p.sin()


class BmmReads(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.block = BmmBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, side = self.block(x)
        return h * side


class TwoStreamBlock(nn.Module):
    """Two inputs projected by two layers and joined in the other order (Flux's double-stream
    block: text and image streams): Inductor's graph reads ``add_q`` before ``to_q``, Dynamo's
    reads them the other way round."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.to_q, self.add_q = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.to_q(x)
        joined = torch.cat([self.add_q(c), q], dim=1).relu()
        return joined[:, x.shape[1] :], joined[:, : x.shape[1]]


class TwoStream(nn.Module):
    def __init__(self, n: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TwoStreamBlock(dim) for _ in range(n)])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, c = block(x, c)
        return x + c


class CrossedTowers(nn.Module):
    """Two independent towers whose outputs are joined in the other order: Inductor's graph runs
    tower ``b`` first (it moves each producer next to its consumer), Dynamo's runs ``a`` first."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a, self.b = Block(dim), Block(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ha = self.a(x)
        hb = self.b(y)
        return self.out(torch.cat([hb, ha]).relu())


class ShapeRead(nn.Module):
    """A layer that reads one of its parameters for its shape alone: Dynamo's graph reads
    ``extra``, Inductor's (``zeros_like`` decomposed to ``full``) reads it no more."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.extra = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + torch.zeros_like(self.extra))


class ShapeReadFirst(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a, self.b = ShapeRead(dim), Block(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class RootReadFirst(nn.Module):
    """The parent reads an offloaded block's weight in its own forward, before the blocks: a region
    of no module, named after a node (the node's name differs between Dynamo's and Inductor's
    graphs)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a, self.b = Block(dim), Block(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x * self.a.fc1.bias[: x.shape[1]]))
