"""Offload a model's vision tower and layer stack, compile it as one graph, check the result.

Runs on a GPU (weights in pinned host memory, fetched over the bus) and on a CPU-only machine
(``device="cpu"``: host and device are the same memory, the graph is rewritten all the same).
"""

import argparse

import torch
from torch import nn

import fx_offload


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Model(nn.Module):
    def __init__(self, dim: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(dim, dim), Block(dim))
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, 16)

    def forward(self, x):
        x = self.visual(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Model().to(device).eval()
    x = torch.randn(8, 256, device=device)
    with torch.no_grad():
        expected = model(x)

    plan = fx_offload.offload(model, ["visual", "layers.*"], device=device)
    print(plan, end="\n\n")

    compiled = torch.compile(model, backend="offload_inductor")
    with torch.no_grad():
        out = compiled(x)
    error = (out - expected).abs().max().item()
    print(f"compiled offloaded forward on {device}: max |difference| to the resident model = {error:.2e}")

    with torch.no_grad():
        text = fx_offload.explain(model, x)
    calls = [line.strip() for line in text.splitlines() if "fx_offload" in line]
    print(f"\nthe rewritten graph has {len(calls)} fx_offload calls; the first three:")
    print("\n".join(call.split(";")[0] for call in calls[:3]))
    print(
        "(fetch / wait / release: a region copied in during the call and freed after its last use; "
        "a head, whose weights stay on the device between calls, refilled after each call, has no "
        "op where the graph runs without CUDA graphs: its buffers are passed as the graph's inputs)"
    )

    fx_offload.restore(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected), "restore changed a value"
    print("\nrestored: every parameter back on", device, "with its values unchanged")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()  # no options: --help says what it does
    main()
