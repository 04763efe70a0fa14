"""Input checks of the public entries (`generate`, `Engine`, the CLI): each bad input is a
ValueError / TypeError that names the argument, what it got and what would work."""
from __future__ import annotations

import dataclasses
import numbers
import os

import torch

from .guard import gib, out_of_memory

MAX_SEED = 2**62


def is_int(x) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def need_int(name: str, x, lo: int | None = None, hi: int | None = None) -> int:
    """x as an int within [lo, hi], or a clear error (bools and floats are refused)."""
    if not is_int(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}" if lo is not None else f"<= {hi}"
        raise ValueError(f"{name} must be {bounds}, got {x}")
    return int(x)


def need_number(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    return float(x)


def need_real(name: str, x, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
              open_hi: bool = False, finite: bool = True) -> float:
    """x as a float within its bounds, or a clear error: bools and non-numbers are a TypeError;
    NaN, a value out of bounds, and +-inf where finite is asked are a ValueError."""
    v = need_number(name, x)
    below = lo is not None and (v <= lo if open_lo else v < lo)
    above = hi is not None and (v >= hi if open_hi else v > hi)
    if v != v or below or above or (finite and v in (float("inf"), float("-inf"))):
        if lo is not None and hi is not None:
            want = f"lie in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        elif lo is not None:
            want = f"be {'>' if open_lo else '>='} {lo:g}{' and finite' if finite else ''}"
        elif hi is not None:
            want = f"be {'<' if open_hi else '<='} {hi:g}{' and finite' if finite else ''}"
        else:
            want = "be finite" if finite else "be a number (not NaN)"
        raise ValueError(f"{name} must {want}, got {x!r}")
    return v


def check_config_fields(cfg, what: str) -> None:
    """Check every field of a config dataclass against its annotation and store it as a plain
    Python value (NumPy numbers become int / float; JSON writes them back). A wrong type is a
    TypeError naming the field: a string n_heads or a None layer_norm_eps would otherwise load
    and fail, or change results, deep inside the first call."""
    for f in dataclasses.fields(cfg):
        v, kind, name = getattr(cfg, f.name), f.type, f"{what}: {f.name}"
        if kind == "int":
            v = need_int(name, v)
        elif kind == "float":
            v = need_real(name, v)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be true or false, got {type(v).__name__} {v!r}")
        elif kind in ("str", "str | None"):
            if not (isinstance(v, str) or (v is None and kind == "str | None")):
                raise TypeError(f"{name} must be a string{' or None' if kind != 'str' else ''}, "
                                f"got {type(v).__name__} {v!r}")
        elif kind in ("list[int]", "list[float]"):
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"{name} must be a list, got {type(v).__name__} {v!r}")
            one = need_int if kind == "list[int]" else need_real
            v = [one(f"{name}[{i}]", x) for i, x in enumerate(v)]
        else:
            raise AssertionError(f"check_config_fields: no rule for {f.name}: {kind}")
        setattr(cfg, f.name, v)


def config_from_dict(cls, data, source: str, *, complete: bool):
    """cls(**data) for a config read from a file: data must be a dict with no unknown field and
    every field when `complete` (an artifact's config.json, written whole by save_pretrained: a
    missing n_heads must not quietly become the default and change the module), or at least the
    required ones. Every problem is a ValueError that names `source`."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the config must be a JSON object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    needed = names if complete else [f.name for f in dataclasses.fields(cls)
                                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in needed if n not in data]
    if unknown or missing:
        parts = ([f"unknown fields {unknown}"] if unknown else []) + ([f"missing fields {missing}"] if missing else [])
        raise ValueError(f"{source}: {cls.__name__} " + "; ".join(parts))
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def check_tensors(state: dict, expected: dict, source: str, what: str) -> torch.dtype | None:
    """Check tensors read from `source` against `expected` (name -> a tensor, meta is fine, of the
    shape and dtype kind the config needs): no name missing or unexpected, every shape, a
    floating dtype where a float is expected and an integer one where an int is (a file of
    int32 weights or bool masks is corrupt, not something to cast), and finite floats (NaN
    weights would turn every logit to NaN and every token to id 0). Returns the dtype to hold
    the floats in: theirs when they share one, else their promotion (fp16 with bf16 is fp32),
    so a mixed file loses nothing; None when no float is expected. ValueError naming
    `source` and the tensor otherwise."""
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{source}: {k} must be a torch.Tensor, got {type(t).__name__}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshapen:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {unexpected}"] if unexpected else [])
        if misshapen:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs expected "
                                                       f"{tuple(expected[k].shape)}" for k in misshapen))
        raise ValueError(f"{source} does not match the {what}: " + "; ".join(parts))
    floats = []
    for k in sorted(expected):
        t, want_float = state[k], expected[k].is_floating_point()
        if want_float and not t.is_floating_point():
            raise ValueError(f"{source}: tensor {k} is {t.dtype}, the {what} needs a floating-point tensor")
        if not want_float and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{source}: tensor {k} is {t.dtype}, the {what} needs an integer tensor")
        if want_float:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{source}: tensor {k} holds {bad} non-finite values (NaN or inf) of {t.numel()}; "
                                 "the file is corrupt or its training diverged")
            floats.append(t.dtype)
    dtype = None
    for d in floats:
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype


def model_device(model) -> tuple[torch.device, torch.dtype]:
    """The one device and the floating dtype of a model's parameters, or a clear error when the
    model is split across devices (device_map sharding) or has no data (meta tensors)."""
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"the model's parameters span several devices {sorted(map(str, devices))}; svgt_fast runs "
                         "a model on one device: load it without device_map sharding and call model.to(device)")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError("the model's parameters are on the meta device (not loaded); load real weights first")
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the model mixes parameter dtypes {sorted(map(str, dtypes))}; cast it to one "
                         "with model.to(dtype)")
    return device, params[0].dtype


def check_tensor_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    """Inputs may live on the CPU (they are copied over) or on the model's device; another
    accelerator is refused rather than copied silently across devices."""
    if x.device.type == "cpu" or _same_device(x.device, device):
        return
    raise ValueError(f"{name} is on {x.device} but the model is on {device}; move it with .to({str(device)!r}) "
                     "(CPU tensors are accepted too)")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def check_engine_args(info, device: torch.device, model_dtype: torch.dtype, *, max_batch, max_seq_len, dtype,
                      max_bridge_tokens, attention, cuda_graphs, prefill_tokens, backends) -> tuple[int, str]:
    """Engine constructor checks; returns (max_seq_len, attention) with the defaults resolved."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if dtype is not None and dtype != model_dtype:
        raise ValueError(f"engine dtype {dtype} differs from the model's {model_dtype}: call model.to({dtype}) first")
    if attention not in backends:
        raise ValueError(f"attention must be one of {backends}, got {attention!r}")
    if attention == "auto":
        attention = "triton" if device.type == "cuda" else "torch"
    if attention == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention='triton' needs a CUDA device (on CPU set TRITON_INTERPRET=1 before importing "
                         "triton, for tests only); use attention='torch' or 'auto'")
    if attention == "triton" and device.type != "cuda":
        from .kernels import interpreter_problem

        if (problem := interpreter_problem(model_dtype)) is not None:
            raise RuntimeError(problem)
    need_int("max_batch", max_batch, 1)
    if max_seq_len is None:
        max_seq_len = info.max_positions
    need_int("max_seq_len", max_seq_len, 2)
    if max_seq_len > info.max_positions:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {info.max_positions} positions "
                         "(max_position_embeddings); no request could use the extra cache")
    need_int("max_bridge_tokens", max_bridge_tokens, 1, 16)
    need_int("prefill_tokens", prefill_tokens, 1)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    return max_seq_len, attention


def check_head_dim(attention: str, head_dim: int) -> None:
    if attention == "triton" and (head_dim < 16 or head_dim & (head_dim - 1)):
        raise ValueError(f"attention='triton' needs a head dim that is a power of two >= 16, this model has "
                         f"{head_dim}; use attention='torch'")


def cache_oom(device, max_batch: int, max_seq_len: int, n_bytes: int) -> MemoryError:
    return out_of_memory(
        f"the KV cache for max_batch={max_batch}, max_seq_len={max_seq_len} ({gib(n_bytes)}) does not fit on {device}",
        "lower max_batch or max_seq_len (the cache grows with their product)")


def check_prompts(prompts, device: torch.device, vocab_size: int) -> None:
    """Engine.generate's prompts: a non-empty list of non-empty 1-D integer tensors of token ids."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D token id tensors")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"prompt {i} must be a tensor of token ids, got {type(p).__name__}")
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got shape {tuple(p.shape)}")
        if p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt {i} must hold int64 or int32 token ids, got {p.dtype}")
        check_tensor_device(f"prompt {i}", p, device)
    ids = torch.cat([p.to(device=device, dtype=torch.long) for p in prompts])
    lo, hi = torch.stack(ids.aminmax()).tolist()  # one host sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompts hold token ids outside the vocabulary [0, {vocab_size})")
