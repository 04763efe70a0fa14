"""What svgt_fast needs to know about a Hugging Face causal LM backbone.

One place that finds the decoder layers, the embedding, the final norm and the LM head of the
supported families (Llama, Mistral, Qwen2/2.5, Qwen3), picks the extract layer of DESIGN §1 and
checks that a value module or a request fits the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as mmod  # the global hook registries

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def default_extract_layer(num_layers: int) -> int:
    """DESIGN §1: L//2 when the model is deeper than 20 layers, else L-3 (at least 0)."""
    if num_layers < 2:
        raise ValueError(f"a backbone needs at least 2 decoder layers for SVGT, got {num_layers}")
    return num_layers // 2 if num_layers > 20 else max(num_layers - 3, 0)


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about one backbone. `extract_layer` is e: layers 0..e form the lower stack."""

    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    sliding_window: int | None
    rope_type: str = "default"
    # Sequences up to this many positions keep the model's RoPE frequencies fixed; past it
    # Hugging Face recomputes them from the sequence length (rope_type "dynamic", "longrope").
    # None: fixed at every length (default, linear, yarn, llama3, ...).
    rope_fixed_positions: int | None = None

    def check_extract_layer(self, extract_layer: int) -> None:
        if not 0 <= extract_layer < self.num_layers - 1:
            raise ValueError(
                f"extract layer {extract_layer} does not fit a backbone of {self.num_layers} layers: "
                f"it must lie in 0..{self.num_layers - 2} so that the upper stack is not empty"
            )


def check_fits(what: str, model: nn.Module, *, hidden_size: int, num_layers: int | None = None,
               model_type: str | None = None, intermediate_size: int | None = None) -> BackboneInfo:
    """Raise ValueError naming every way an artifact (`what`: "value module", "NeVA artifact (neurons)", ...)
    built for another backbone does not fit `model`; None skips a field. Returns the model's info."""
    info = backbone_info(model)
    problems = []
    if hidden_size != info.hidden_size:
        problems.append(f"hidden size {hidden_size} != backbone's {info.hidden_size}")
    if intermediate_size is not None:
        inter = int(getattr(model.config, "intermediate_size", -1))
        if intermediate_size != inter:
            problems.append(f"MLP size {intermediate_size} != backbone's {inter}")
    if num_layers is not None and num_layers != info.num_layers:
        problems.append(f"built for {num_layers} layers, backbone has {info.num_layers}")
    if model_type is not None and model_type != info.model_type:
        problems.append(f"built for model_type {model_type!r}, backbone is {info.model_type!r}")
    if problems:
        raise ValueError(f"{what} does not fit this backbone: " + "; ".join(problems))
    return info


def backbone_parts(model: nn.Module):
    """Return (inner_model, layers, lm_head) of a *ForCausalLM model, with a clear error otherwise."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    lm_head = getattr(model, "lm_head", None)
    if inner is None or layers is None or lm_head is None:
        raise ValueError(
            f"{type(model).__name__} is not a supported causal LM: expected .model.layers and .lm_head "
            f"(families: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return inner, layers, lm_head


def backbone_info(model: nn.Module) -> BackboneInfo:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass a Hugging Face causal LM")
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _, layers, _ = backbone_parts(model)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if window is not None and layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    rope_type, rope_fixed = _rope_regime(model, cfg)
    return BackboneInfo(
        model_type=model_type,
        hidden_size=int(cfg.hidden_size),
        num_layers=len(layers),
        vocab_size=int(cfg.vocab_size),
        max_positions=int(getattr(cfg, "max_position_embeddings", 1 << 30)),
        sliding_window=int(window) if window is not None else None,
        rope_type=rope_type,
        rope_fixed_positions=rope_fixed,
    )


def _rope_regime(model: nn.Module, cfg) -> tuple[str, int | None]:
    """The rotary module's rope_type, and how long a sequence may be before HF changes its
    frequencies: its forward (transformers' `dynamic_rope_update`) grows a "dynamic" rope's
    base once max(position_ids) + 1 exceeds `original_max_seq_len`, and switches "longrope" to
    its long factors once it exceeds `original_max_position_embeddings` — for every position at
    once, so keys already in a cache would have to be rotated again."""
    inner, _, _ = backbone_parts(model)
    rotary = getattr(inner, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str):
        raise ValueError(f"per-layer RoPE types ({rope_type!r}) are not supported")
    if "dynamic" in rope_type:
        return rope_type, int(getattr(rotary, "original_max_seq_len", cfg.max_position_embeddings))
    if rope_type == "longrope":
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        limit = params.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
        if limit is None:
            raise ValueError("rope_type 'longrope' without original_max_position_embeddings in the config")
        return rope_type, int(limit)
    return rope_type, None


def check_total_length(info: BackboneInfo, total: int, what: str) -> None:
    """Refuse sequences the model cannot attend over exactly (context or sliding window)."""
    if total > info.max_positions:
        raise ValueError(
            f"{what} needs {total} positions but the model's context is {info.max_positions} "
            f"(max_position_embeddings); shorten the prompt or max_new_tokens"
        )
    if info.sliding_window is not None and total > info.sliding_window:
        raise ValueError(
            f"{what} needs {total} positions, beyond the model's sliding window of "
            f"{info.sliding_window}; sliding-window attention is not supported, shorten the request"
        )
    if info.rope_fixed_positions is not None and total > info.rope_fixed_positions:
        raise ValueError(
            f"{what} needs {total} positions, beyond the {info.rope_fixed_positions} up to which this model's "
            f"RoPE (rope_type {info.rope_type!r}) keeps its frequencies; past that Hugging Face recomputes "
            f"them from the sequence length for every position at once, which no KV cache reproduces "
            f"(HF's own cached generate does not either); shorten the request"
        )


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


# The projections the fast engine reads as plain weight matrices (fast_model.ModelWeights).
_READ_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


# Hooks that change nothing the fast engine computes: svgt_fast's own (the reference engine's and
# the fits', live only while those run, maybe in another thread), and transformers' output
# recorders, which any output_hidden_states=True call installs for good and which only record
# while HF collects outputs.
_KNOWN_HOOK_MODULES = ("svgt_fast.", "transformers.utils.output_capturing")


def _foreign_hooks(hook_dicts) -> list:
    return [h for d in hook_dicts for h in d.values()
            if not str(getattr(h, "__module__", "")).startswith(_KNOWN_HOOK_MODULES)]


def _describe(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


def fast_path_problems(model: nn.Module) -> list[str]:
    """What the fast engine would silently leave out of this model. It runs its own forward on
    the backbone's weights, never the modules' forwards, so it must refuse: a projection that is
    not a plain nn.Linear (a LoRA adapter injected and not merged, a quantized linear), a
    parameter that is not a plain floating tensor (quantized weights), any forward hook, and
    training mode where it adds attention dropout.
    One pass over the modules (under 1 ms at the Llama-3-8B shape on a 2-core CPU), so every call
    checks: PEFT injects adapters into the model in place, after an engine may exist."""
    global_hooks = mmod._global_forward_pre_hooks, mmod._global_forward_hooks
    problems = [f"a global forward hook ({_describe(h)}) is registered" for h in _foreign_hooks(global_hooks)]
    _, layers, _ = backbone_parts(model)
    dropout = max(float(getattr(model.config, "attention_dropout", 0.0) or 0.0),
                  float(getattr(getattr(layers[0], "self_attn", None), "attention_dropout", 0.0) or 0.0))
    if model.training and dropout > 0:  # HF applies it in training mode; the engine computes eval mode
        problems.append(f"the model is in training mode with attention_dropout={dropout:g} (call model.eval())")
    bad = []
    for mod in model.modules():
        if (mod._forward_hooks or mod._forward_pre_hooks) and _foreign_hooks((mod._forward_pre_hooks, mod._forward_hooks)):
            bad.append(mod)
        else:
            for p in mod._parameters.values():
                if p is not None and (type(p) is not nn.Parameter or not p.is_floating_point()):
                    bad.append(mod)
                    break
    for layer in layers:
        for block_name, names in _READ_LINEARS:
            block = getattr(layer, block_name, None)
            for name in names:
                sub = getattr(block, name, None)
                if type(sub) is not nn.Linear:
                    bad.append((layer, f"{block_name}.{name}", sub))
    if not bad and not problems:
        return problems
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}  # only on failure: slower
    for item in bad:
        if isinstance(item, tuple):
            layer, name, sub = item
            what = "is missing" if sub is None else f"is a {type(sub).__module__}.{type(sub).__qualname__}, not torch.nn.Linear"
            problems.append(f"{names[id(layer)]}.{name} {what}")
            continue
        hooks = _foreign_hooks((item._forward_pre_hooks, item._forward_hooks))
        if hooks:
            problems.append(f"{names[id(item)]} has a forward hook ({_describe(hooks[0])})")
        else:
            pname, p = next((n, p) for n, p in item._parameters.items() if p is not None
                            and (type(p) is not nn.Parameter or not p.is_floating_point()))
            problems.append(f"{names[id(item)]}.{pname} is a {type(p).__qualname__} of dtype {p.dtype}, not a plain "
                            f"floating parameter")
    return problems


def check_fast_path(model: nn.Module) -> None:
    """Refuse a model whose forward differs from what the fast engine computes (fast_path_problems)."""
    problems = fast_path_problems(model)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"the fast engine runs its own forward on the backbone's weights and would silently skip what "
            f"these change: {shown}. Merge adapters into the weights (PEFT: merge_and_unload()), load "
            f"unquantized weights, remove the hooks, call model.eval() — or pass engine='reference', which runs the modules' "
            f"own forwards (far slower)")
