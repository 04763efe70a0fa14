"""Import the SVGT authors' stage-2 / stage-3 `.pt` checkpoints into our safetensors artifact.

Their files are dicts with either `model_state_dict: {value_transformer, discriminator[, generator]}`
or those three keys at top level; each inner state dict has no prefix. As in their generation
script, the ValueTransformer and Discriminator come from stage 2 and the generator from stage 3.
Keys used only by their stage-2 training (response/cross-attention path) are dropped, and listed
in `conversion.json` beside the artifact; any other unknown key is an error.
"""
from __future__ import annotations

import json
import os
import pickle

import torch

from .value_module import SVGTConfig, SVGTModule

# ValueTransformer parameters that only the stage-2 (prompt/response cross-attention) path uses.
_STAGE2_ONLY = ("response_proj.", "cross_attn.", "cross_norm.", "cross_scale")


def _load_pt(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ValueError(
            f"{path} could not be read as a weights-only torch checkpoint (code in pickles is never run): {exc}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _part(ckpt: dict, name: str, path) -> dict | None:
    holder = ckpt.get("model_state_dict", ckpt)
    if not isinstance(holder, dict):
        raise ValueError(f"{path}: model_state_dict is not a dict")
    part = holder.get(name)
    if part is not None and not isinstance(part, dict):
        raise ValueError(f"{path}: {name} is not a state dict")
    return part


def convert_reference_checkpoint(stage2_pt, stage3_pt, config: SVGTConfig | dict, out_dir) -> SVGTModule:
    """Read the authors' checkpoints, map them onto an SVGTModule of `config`, save it to
    `out_dir` (safetensors + JSON) and return it. Raises ValueError naming any missing,
    unexpected or misshapen key, and FileNotFoundError for a missing file."""
    if isinstance(config, dict):
        config = SVGTConfig.from_dict(config)
    if not isinstance(config, SVGTConfig):
        raise TypeError(f"config must be an SVGTConfig or a dict, got {type(config).__name__}")
    s2, s3 = _load_pt(stage2_pt), _load_pt(stage3_pt)
    vt, disc, gen = _part(s2, "value_transformer", stage2_pt), _part(s2, "discriminator", stage2_pt), _part(s3, "generator", stage3_pt)
    for name, part, path in (("value_transformer", vt, stage2_pt), ("discriminator", disc, stage2_pt), ("generator", gen, stage3_pt)):
        if part is None:
            raise ValueError(f"{path}: no '{name}' state dict (looked in model_state_dict and at top level)")
    if any(k.startswith(("query_tokens", "value_embed", "layers.", "output_proj")) for k in gen):
        raise ValueError(f"{stage3_pt}: the TransformerValueProjector generator is not supported (use VLP or the MLP TokenGenerator)")
    kind = "vlp" if "query_seeds" in gen else "mlp"
    if kind != config.generator:
        raise ValueError(f"{stage3_pt}: holds a {kind!r} generator but config.generator is {config.generator!r}")
    w0 = gen.get("generator.0.weight")
    if kind == "mlp" and w0 is not None and w0.shape[1] != config.value_dim:
        raise ValueError(
            f"{stage3_pt}: TokenGenerator input width {w0.shape[1]} != value_dim {config.value_dim} "
            f"(only use_delta_only=True generators are supported)"
        )

    dropped = sorted(k for k in vt if k.startswith(_STAGE2_ONLY))
    state = {f"value_transformer.{k}": v for k, v in vt.items() if k not in dropped}
    state.update({f"discriminator.{k}": v for k, v in disc.items()})
    state.update({f"generator.{k}": v for k, v in gen.items()})

    module = SVGTModule(config)
    module.load_state(state, source=f"{stage2_pt} + {stage3_pt}")
    module.save_pretrained(out_dir)
    record = {
        "stage2": os.path.basename(os.fspath(stage2_pt)),
        "stage3": os.path.basename(os.fspath(stage3_pt)),
        "dropped_stage2_only_keys": [f"value_transformer.{k}" for k in dropped],
        "training_config": _jsonable(s3.get("training_config")),
    }
    with open(os.path.join(out_dir, "conversion.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return module


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)
