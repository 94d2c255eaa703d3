"""The vLLM hookup: the offload pass as a vLLM ``InductorPass``, and the config that installs it.

vLLM builds and loads the model itself, so nobody calls ``fx_offload.offload`` on it. The pass
does the placing when it first sees a graph: it maps each placeholder's fake tensor back to the
real tensor (through the fake storage the fake mode's converter made from it), selects the
weights read inside modules that the patterns match, places them in pinned host memory, and
rewrites the graph as the core pass does. Parameters that vLLM itself placed in pinned memory
(``--cpu-offload-gb``, ``--cpu-offload-params``: marked ``_vllm_is_uva_offloaded``) are adopted
too: their in-place reads over the bus become prefetched bulk copies.

Patterns name modules as vLLM's model has them (``visual``, ``visual.blocks.*.mlp``,
``language_model.model.layers.1``), or as the compiled module has them (``layers.0.mlp``). vLLM
compiles a module when it first calls it, so while a graph passes through Inductor the model is
on the Python stack: the pass takes it from there, checks the patterns once against all its
module names (a typo fails at engine start, naming the closest module), and names each graph's
weights by their full names. vLLM compiles the decoder, and the vision tower of Qwen2.5-VL and
Qwen2.5-Omni only with ``compile_mm_encoder`` (one graph per block, patch embedding and merger);
``compilation_config`` turns that on when a pattern names a vision tower. Modules vLLM never
compiles (Qwen2.5-Omni's ``audio_tower``) are offloaded through ``offload_modules`` instead.

    from vllm import LLM
    import fx_offload.vllm
    llm = LLM(model, compilation_config=fx_offload.vllm.compilation_config(["visual"]))
    llm.apply_model(fx_offload.vllm.offload_modules(["audio_tower"]))

For the JSON form (``python -m vllm.entrypoints.openai.api_server --compilation-config
'{"inductor_passes": {"post_grad_custom_post_pass": "fx_offload.vllm_pass"}}'``) the pass reads
its patterns from the environment variable ``FX_OFFLOAD_VLLM`` (JSON: ``{"patterns": ["mlp"],
"prefetch": 1}``); without it, it adopts only what vLLM's own offload flags placed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._guards import detect_fake_mode
from vllm.compilation.passes.inductor_pass import InductorPass

from fx_offload import backend, matching, ops, placement
from fx_offload.options import AUTO, Options
from fx_offload.regions import GraphPlan, module_calls, module_name

ENVIRONMENT = "FX_OFFLOAD_VLLM"


class OffloadPass(InductorPass):
    """fx_offload's rewrite as a vLLM post-grad pass.

    Args:
        patterns: fx_offload patterns on vLLM's module names (``visual``,
            ``language_model.model.layers.*.mlp``) or on names inside the module vLLM compiles
            (``layers.*.mlp``, ``mlp``, ``re:layers\\.[0-3]``); ``None`` adopts only the
            parameters vLLM's own offload flags placed.
        prefetch: at most ``prefetch + 1`` regions' weights on the device at once, heads included.
        prefetch_head: how many of each graph's first regions are refilled during the previous
            call (True: one). Off by default here: it is verified under Inductor's CUDA graphs,
            not under vLLM's.
        adopt_vllm_offloaded: also fetch parameters vLLM placed in pinned memory.
    """

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        *,
        prefetch: int | str = backend.DEFAULT_PREFETCH,
        prefetch_head: bool | int = False,
        adopt_vllm_offloaded: bool = True,
    ) -> None:
        if patterns is not None and "swap" in matching.normalize_policies(patterns, None):
            raise ValueError(
                f"patterns {dict(patterns)!r} ask for policy 'swap', which vLLM cannot run: a swap "
                "happens between compiled calls, and vLLM calls its compiled pieces itself. Use "
                "'stream' (a list of patterns) under vLLM"
            )
        self.patterns = None if patterns is None else matching.normalize_patterns(patterns)
        options = Options(prefetch=prefetch, prefetch_head=prefetch_head)
        self.prefetch_head = 0 if options.prefetch_head == AUTO else options.prefetch_head  # 'auto': off
        self.prefetch = options.prefetch
        if self.prefetch == AUTO:
            self.prefetch = backend.default_prefetch(self.prefetch_head)
        self.adopt_vllm_offloaded = bool(adopt_vllm_offloaded)
        self._checked: set[int] = set()  # id() of the models whose names the patterns were checked on

    @classmethod
    def from_environment(cls) -> OffloadPass:
        """The pass that ``FX_OFFLOAD_VLLM`` (a JSON object of this class's arguments) describes."""
        text = os.environ.get(ENVIRONMENT, "")
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(
                f'{ENVIRONMENT} must be a JSON object such as \'{{"patterns": ["mlp"]}}\', '
                f"got {text!r} ({error})"
            ) from None
        if not isinstance(config, dict):
            raise ValueError(f"{ENVIRONMENT} must be a JSON object, got {text!r}")
        return cls(**config)

    def config(self) -> dict:
        return {
            "patterns": list(self.patterns) if self.patterns is not None else None,
            "prefetch": self.prefetch,
            "prefetch_head": self.prefetch_head,
            "adopt_vllm_offloaded": self.adopt_vllm_offloaded,
        }

    def uuid(self) -> str:
        # vLLM caches compiled graphs by this: it changes with the patterns, options and our code
        return backend.digest(json.dumps(self.config(), sort_keys=True)).hex()

    def check(self, model: nn.Module) -> None:
        """Check the patterns once against ``model``'s module names, at its first compiled graph.

        A pattern must select a module somewhere in the model, either by its full name
        (``visual.blocks.0.mlp``, ``language_model.model.layers.1``) or by its name inside a module
        vLLM compiles (``layers.1.mlp``), and what it selects must meet code vLLM compiles.
        """
        if self.patterns is None or id(model) in self._checked:
            return
        self._checked.add(id(model))
        modules = dict(model.named_modules(remove_duplicate=False))
        compiled = compiled_modules(model)
        inner = {_relative(name, root) for root in compiled for name in modules if _within(name, root)}
        try:
            matching.select(self.patterns, [*modules, *sorted(inner - modules.keys())])
        except ValueError as error:
            raise ValueError(
                f"{error}. In vLLM the names are those of vLLM's model ({type(model).__name__}): "
                "llm.apply_model(lambda model: [name for name, _ in model.named_modules()]) lists them"
            ) from None
        for pattern in self.patterns:
            hits = [name for name in modules if matching.pattern_matches(pattern, name)]
            if not hits or not compiled:
                continue  # matched inside a compiled module only, or a mode with no compiled modules
            if not any(_within(c, h) or _within(h, c) for h in hits for c in compiled):
                raise ValueError(_not_compiled_message(pattern, hits, compiled))

    def __call__(self, graph: fx.Graph) -> None:
        plan = self.plan(graph)
        if plan.offloaded_inputs:
            ops.lower_in_inductor()
            backend.run_pass(graph.owning_module, plan)

    def plan(self, graph: fx.Graph) -> GraphPlan:
        """Place what this graph's patterns select and say which placeholders are offloaded."""
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        reals = _real_tensors(placeholders)
        calls = module_calls(graph)
        found = _model_being_compiled()
        base = ""
        if found is not None:
            model, compiled = found
            self.check(model)
            base = _full_names(model)[id(compiled)]
        roots: set[str] = set()
        if self.patterns is not None:
            names = {""} | {prefix for name in calls.values() for prefix in matching.prefixes(name)}
            # without the model in sight, each graph is checked on its own, except where
            # VLLM_COMPILE splits the model at attention and runs this pass per piece
            strict = found is None and not _piecewise()
            selected = matching.select(self.patterns, sorted(names), strict=strict)
            roots = {name for hits in selected.values() for name in hits}
            if base:
                full = {name: _join(base, name) for name in names}
                above = {prefix for name in full.values() for prefix in matching.prefixes(name)}
                hits = matching.select(self.patterns, sorted(above), strict=False)
                chosen = {name for found_names in hits.values() for name in found_names}
                roots |= {name for name, long in full.items() if matching.is_within(long, chosen)}

        offloaded: dict[int, str] = {}
        region_modules = {key for key, name in calls.items() if roots and matching.is_within(name, roots)}
        to_place: list[tuple[torch.Tensor, tuple[str, ...]]] = []
        positions: list[int] = []
        for i, (node, real) in enumerate(zip(placeholders, reals)):
            # vLLM's CPU layers repack some weights into plain tensors after loading; per-call
            # inputs have symbolic sizes and were left unmatched by _real_tensors
            if not isinstance(real, torch.Tensor) or real.dim() == 0:
                continue  # a scalar is no weight (vLLM's CPU GEMM handles are int64 scalars)
            users = [_innermost(user) for user in node.users]
            owner = _join(base, users[0][1]) if users and users[0] else "?"
            name = f"{owner} {tuple(real.shape)}"
            record = placement.lookup(real)
            if (
                record is None
                and self.adopt_vllm_offloaded
                and getattr(real, "_vllm_is_uva_offloaded", False)
            ):
                record = _adopt(real, name)
                region_modules |= {user[0] for user in users if user}
            if record is not None:
                offloaded[i] = record.names[0]
            elif roots and any(user and matching.is_within(user[1], roots) for user in users):
                to_place.append((real, (name,)))
                positions.append(i)
        if to_place:
            device = to_place[0][0].device
            for i, record in zip(positions, placement.place(to_place, device, None)):
                offloaded[i] = record.names[0]
        device_type = next((placement.lookup(reals[i]).device.type for i in offloaded), "cpu")
        return GraphPlan(offloaded, frozenset(region_modules), self.prefetch, device_type, self.prefetch_head)


def compilation_config(
    patterns: Sequence[str] | None,
    *,
    mode: int | None = None,
    compile_mm_encoder: bool | None = None,
    **options,
) -> dict:
    """The ``compilation_config`` for ``vllm.LLM`` that runs fx_offload's pass.

    Args:
        patterns: see ``OffloadPass``.
        mode: vLLM's compilation mode; ``None`` keeps vLLM's default (VLLM_COMPILE on GPU,
            DYNAMO_TRACE_ONCE on CPU). Every mode compiles with Inductor, which runs the pass.
        compile_mm_encoder: compile the multimodal encoders vLLM can compile (Qwen2.5-VL's and
            Qwen2.5-Omni's ``visual``: per block, patch embedding and merger); ``None``: on when a
            pattern names a vision tower (a name part starting with ``visual`` or ``vision``).
            vLLM never compiles some encoders (Qwen2.5-Omni's ``audio_tower``): offload those
            with ``llm.apply_model(fx_offload.vllm.offload_modules([...]))``.
        options: ``prefetch``, ``prefetch_head``, ``adopt_vllm_offloaded``.
    """
    offload_pass = OffloadPass(patterns, **options)
    config: dict = {"inductor_compile_config": {"post_grad_custom_post_pass": offload_pass}}
    if compile_mm_encoder is None:
        compile_mm_encoder = any(_names_vision(p) for p in offload_pass.patterns or ())
    if compile_mm_encoder:
        config["compile_mm_encoder"] = True
    if mode is not None:
        config["mode"] = mode
        config["backend"] = "inductor"
    return config


def offload_modules(patterns: Sequence[str], **options) -> Callable[[nn.Module], list[str]]:
    """A function for ``LLM.apply_model`` that offloads modules vLLM does not compile.

    vLLM runs some towers eagerly whatever its config says (Qwen2.5-Omni's ``audio_tower``), so
    its pass never sees their weights. In the engine's worker, the returned function places the
    parameters of the modules ``patterns`` select (vLLM's module names) in host memory, as
    ``fx_offload.offload`` does, and compiles each selected module's ``forward`` with
    ``offload_inductor``; vLLM then calls the compiled forward::

        llm = LLM(model, compilation_config=fx_offload.vllm.compilation_config(["visual"]))
        llm.apply_model(fx_offload.vllm.offload_modules(["audio_tower"]))  # before generating

    The function returns the names of the modules it compiled. A pattern that selects
    nothing, or a module vLLM compiles itself (give those to ``compilation_config``), raises
    ``ValueError``. ``options`` are ``offload_inductor``'s (``prefetch``, ``prefetch_head``).
    """
    patterns = matching.normalize_patterns(patterns)
    options = dict(options)
    Options.from_mapping(options)  # bad options fail here, not in the engine

    def offload_in_engine(model: nn.Module) -> list[str]:
        import fx_offload

        names = [name for name, _ in model.named_modules()]
        selected = matching.select(patterns, names)
        roots = sorted({name for hits in selected.values() for name in hits})
        roots = [name for name in roots if not matching.is_within(name, [r for r in roots if r != name])]
        compiled = compiled_modules(model)
        for name in roots:
            inside = [c for c in compiled if _within(c, name) or _within(name, c)]
            if inside:
                raise ValueError(
                    f"{name!r} is compiled by vLLM itself ({', '.join(inside[:3])}): offload it through "
                    f"compilation_config=fx_offload.vllm.compilation_config([{name!r}]) instead"
                )
        fx_offload.offload(model, [f"re:{re.escape(name)}" for name in roots])  # these modules only
        for name in roots:
            module = model.get_submodule(name)
            module.forward = torch.compile(module.forward, backend="offload_inductor", options=options)
        return roots

    return offload_in_engine


def compiled_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that vLLM compiles (and so runs this pass on).

    Empty where vLLM compiles no module itself (mode 1 compiles the whole forward).
    """
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, TorchCompileWithNoGuardsWrapper) and not getattr(module, "do_not_compile", True)
    ]


def _names_vision(pattern: str) -> bool:
    text = pattern[3:] if pattern.startswith("re:") else pattern
    return any(part.lstrip("^(").startswith(("visual", "vision")) for part in re.split(r"[.\\]", text))


def _model_being_compiled() -> tuple[nn.Module, nn.Module] | None:
    """The model and its module being compiled, from the modules called on this stack.

    vLLM compiles a module when it is first called (the model's forward, or an encoder block's),
    so while its graph passes through Inductor the model's modules are on the Python stack: the
    outermost is the model, the innermost of the model's is the one compiled.
    """
    modules = []
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and not isinstance(candidate, fx.GraphModule):
            if not modules or candidate is not modules[-1]:
                modules.append(candidate)
        frame = frame.f_back
    if not modules:
        return None
    model = modules[-1]
    names = _full_names(model)
    inner = next((module for module in modules if id(module) in names), model)
    return model, inner


def _full_names(model: nn.Module) -> dict[int, str]:
    """``id(module)`` -> its name in ``model`` (``''`` for the model)."""
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base and name else base or name


def _relative(name: str, root: str) -> str:
    """``name`` as seen from the module ``root`` (a descendant of it, or ``root`` itself)."""
    return "" if name == root else name[len(root) + 1 :] if root else name


def _within(name: str, root: str) -> bool:
    return matching.is_within(name, [root])


def _not_compiled_message(pattern: str, hits: list[str], compiled: list[str]) -> str:
    shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
    where = ", ".join(compiled[:4]) + (", ..." if len(compiled) > 4 else "")
    return (
        f"pattern {pattern!r} selects {shown}, which vLLM does not compile here (it compiles {where}), "
        "so the pass would never see its weights. For a vision tower (Qwen2.5-VL, Qwen2.5-Omni "
        "'visual') set compilation_config's compile_mm_encoder=True (fx_offload.vllm."
        "compilation_config does when a pattern names 'visual'); for a module vLLM never compiles "
        "(Qwen2.5-Omni's 'audio_tower') call llm.apply_model(fx_offload.vllm.offload_modules("
        f"[{pattern!r}])) and leave it out of the pass's patterns"
    )


def _real_tensors(placeholders: list[fx.Node]) -> list[torch.Tensor | None]:
    """The real tensor behind each placeholder, where the fake mode made its fake from one.

    AOTAutograd gives placeholders fresh fake tensors, views of the ones Dynamo made from the
    real inputs: they share the fake storage, which the fake mode's converter maps back.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    values = [node.meta.get("val") for node in placeholders]
    fake_mode = detect_fake_mode(values)
    if fake_mode is None:
        return [None] * len(placeholders)
    converter = fake_mode.fake_tensor_converter
    by_storage: dict[StorageWeakRef, list[torch.Tensor]] = {}
    for real in list(converter.meta_converter.describer.lookup_tensor.keys()):
        fake = converter._get_memo(real)
        if fake is not None:
            by_storage.setdefault(StorageWeakRef(fake.untyped_storage()), []).append(real)
    found: list[torch.Tensor | None] = []
    for value in values:
        candidates = []
        # parameters have static sizes; comparing a symbolic one would add a shape guard
        if isinstance(value, torch.Tensor) and not _symbolic(value):
            candidates = [
                real
                for real in by_storage.get(StorageWeakRef(value.untyped_storage()), [])
                if real.shape == value.shape
                and real.stride() == value.stride()
                and real.storage_offset() == value.storage_offset()
            ]
        found.append(candidates[0] if len(candidates) == 1 else None)
    return found


def _piecewise() -> bool:
    from vllm.config import CompilationMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return config is not None and config.compilation_config.mode == CompilationMode.VLLM_COMPILE


def _symbolic(value: torch.Tensor) -> bool:
    return not all(isinstance(d, int) for d in (*value.shape, *value.stride(), value.storage_offset()))


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if not stack:
        return None
    key, (path, _cls) = stack[-1]
    return key.split("@")[0], module_name(path)


def _adopt(param: nn.Parameter, name: str) -> placement.HostParameter:
    """Register a parameter vLLM already made a device view of pinned memory."""
    nbytes = param.numel() * param.element_size()
    buffer = (ctypes.c_uint8 * nbytes).from_address(param.data_ptr())
    host = torch.frombuffer(buffer, dtype=torch.uint8).view(param.dtype).view(param.shape)
    return placement.adopt(param, host, (name,))
