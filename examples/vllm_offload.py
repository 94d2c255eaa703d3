"""Generate with vLLM, with and without fx_offload's pass, on a small random model built locally.

    python examples/vllm_offload.py                         # Qwen2, offload every layer's MLP
    python examples/vllm_offload.py --arch llama --patterns "layers.1.*"

Builds a model of a real architecture from a config with random weights (no download), saves it
with ``save_pretrained``, then runs vLLM twice, each in its own process: without the pass and
with ``compilation_config=fx_offload.vllm.compilation_config(patterns)``. Prints the greedy tokens
of both runs and what the pass offloaded in the graph vLLM compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 15, 16, 23, 42]]


def build_model(arch: str, directory: Path, layers: int = 2) -> Path:
    """Save a random ``arch`` causal LM with vLLM-friendly sizes (head_dim 32) to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = kinds[arch]
    config = config_cls(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,  # head_dim 32: vLLM's CPU attention takes it
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model_cls(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def plain_cpu_linears() -> None:
    """Make vLLM's CPU build keep linear weights as graph inputs.

    After loading, vLLM's CPU build packs every linear weight into a oneDNN (or SGL) handle that
    the compiled graph receives as an int64 scalar, so no weight reaches the graph and there is
    nothing to offload. Here the layers take vLLM's own plain fallback, ``F.linear``, the one it
    uses for layers it does not pack. GPU builds need none of this.
    """
    import torch
    from vllm.model_executor.layers import utils

    def dispatch(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = dispatch


def generate(model_dir: str, patterns: list[str] | None, poison: bool) -> dict:
    """One vLLM engine in this process; greedy tokens and the graphs the pass rewrote."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in-process
    import torch
    from vllm import LLM, SamplingParams

    if not torch.cuda.is_available():
        plain_cpu_linears()

    import fx_offload.vllm
    from fx_offload import runtime
    from fx_offload.explain import recording

    runtime.poison_released = poison
    config = fx_offload.vllm.compilation_config(patterns) if patterns is not None else None
    with recording() as graphs:
        llm = LLM(
            model=model_dir,
            skip_tokenizer_init=True,
            max_model_len=128,
            gpu_memory_utilization=0.3,
            compilation_config=config,
        )
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=8, temperature=0)
        )
    names = llm.apply_model(lambda model: [name for name, _ in model.named_parameters()])[0]
    return {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "graphs": graphs,
        "parameters": names,
        "compilation_mode": int(llm.llm_engine.vllm_config.compilation_config.mode),
    }


def run_child(model_dir: str, patterns: list[str] | None, poison: bool = False) -> dict:
    """``generate`` in a fresh process (one vLLM engine per process), its result as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", "--model-dir", model_dir, "--json", str(out)]
        command += ["--patterns", *patterns] if patterns is not None else ["--plain"]
        if poison:
            command.append("--poison")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"vLLM run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            )
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--patterns", nargs="*", default=["mlp"])
    parser.add_argument("--model-dir", help="an existing model directory (else one is built)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--poison", action="store_true", help="NaN-fill released buffers (debug)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # child: no pass
    args = parser.parse_args()

    if args.child:
        patterns = None if args.plain else args.patterns
        Path(args.json).write_text(json.dumps(generate(args.model_dir, patterns, args.poison)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_model(args.arch, Path(tmp) / args.arch))
        plain = run_child(model_dir, None)
        offloaded = run_child(model_dir, args.patterns, args.poison)
    print(f"{args.arch}: vLLM compilation mode {offloaded['compilation_mode']}, patterns {args.patterns}")
    for graph in offloaded["graphs"]:
        print("\n".join(line for line in graph.splitlines() if line.startswith("#")))
    for i, (a, b) in enumerate(zip(plain["tokens"], offloaded["tokens"])):
        print(f"prompt {i}: without pass {a}\n          with pass    {b}")
    same = plain["tokens"] == offloaded["tokens"]
    print("greedy tokens equal:", same)
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "offloaded": offloaded}, indent=2))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
