"""The public call: `svgt_fast.generate`."""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import validate
from .backbone import backbone_info, check_total_length
from .conva import ConVA
from .neva import NeVA
from .plan import SteeringPlan
from .re_control import REControl
from .sampling import NONFINITE, SamplingParams
from .steering import SVGT
from .streaming import GenerationStream, StreamEvent

ENGINES = ("reference", "fast")
__all__ = ["GenerationOutput", "GenerationStream", "StreamEvent", "generate"]


@dataclass
class GenerationOutput:
    """sequences: [B, P + N] the input ids then the new tokens; a [B, P] tensor keeps its own
    padding, ragged lists and text are left-padded with the pad id;
    new_tokens: [B, N], pad id after a row's end; num_new_tokens: [B] tokens each row produced
    (its EOS included); texts: decoded new tokens when a tokenizer was given; trigger_counts: [B]
    how many times each row's value module fired (the prompt's first bridge included; 0 without
    steering); finish_reasons: [B] why each row ended: "stop" (its EOS), "length"
    (max_new_tokens), or "nonfinite" (its next-token logits were NaN or inf, as when a steering
    strength overflows: the row stops there, with a RuntimeWarning, rather than emit garbage).

    timings (seconds): total_s (the call), and with the fast engine prefill_s, decode_s,
    refresh_s (the refresh steps' share of decode_s), steps (sampling steps run: the prefill's
    plus one per decode step), refresh_steps, graph_steps (steps replayed from CUDA graphs). On
    CUDA prefill_s, decode_s and refresh_s are device time (CUDA events); streamed, decode_s
    leaves out the time the consumer held the stream. The reference engine reports total_s and
    steps only."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    num_new_tokens: torch.Tensor
    texts: list[str] | None = None
    timings: dict = field(default_factory=dict)
    trigger_counts: torch.Tensor | None = None  # [B] times the value module fired per row
    finish_reasons: list[str] = field(default_factory=list)


def _is_text(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(p, str) for p in x))


def _as_batch(input_ids, tokenizer, attention_mask, device):
    """Normalise ids / lists / strings into ([B, P] long tensor, [B, P] mask) on `device`."""
    if _is_text(input_ids):
        if tokenizer is None:
            raise ValueError("prompts given as text need tokenizer=...")
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the tokenizer for text prompts; do not pass one")
        prompts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        # One prompt at a time, unpadded: no pad token needed (Llama tokenizers have none);
        # the rows are padded below like any ragged list.
        input_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    elif isinstance(input_ids, (list, tuple)) and attention_mask is not None:
        raise ValueError("attention_mask is built from ragged lists; do not pass one")
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise ValueError("no prompts: input_ids is an empty list")
        nested = isinstance(input_ids[0], (list, tuple))
        rows = [list(r) if isinstance(r, (list, tuple)) else r for r in input_ids] if nested else [list(input_ids)]
        for i, r in enumerate(rows):
            if not isinstance(r, list):
                raise TypeError(f"input_ids mixes token lists and {type(r).__name__} (row {i}); pass a list of lists")
            if len(r) == 0:
                raise ValueError("empty prompt: every prompt needs at least one token")
            if not all(validate.is_int(v) for v in r):
                bad = next(v for v in r if not validate.is_int(v))
                raise TypeError(f"row {i} of input_ids holds {type(bad).__name__} {bad!r}; token ids must be ints")
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(device), mask.to(device)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, a list of token lists or text, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    validate.check_tensor_device("input_ids", input_ids, device)
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, P] with B, P >= 1 (empty prompt?), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor like input_ids, got {type(attention_mask).__name__}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask must hold 0/1 as integers or bools, got {attention_mask.dtype}")
        validate.check_tensor_device("attention_mask", attention_mask, device)
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids.long().to(device), mask.long().to(device)


def _unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens; the ones of the mask must form one block (left or right padding).
    The mask is checked in one host copy (row by row on the device, each check would be a sync)."""
    rows = []
    host = mask.cpu()
    for i in range(ids.shape[0]):
        m = host[i]
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"attention_mask row {i} has values other than 0 and 1")
        on = torch.nonzero(m).flatten()
        if on.numel() == 0:
            raise ValueError(f"empty prompt: row {i} has no tokens (attention_mask all zero)")
        lo, hi = int(on[0]), int(on[-1]) + 1
        if hi - lo != on.numel():
            raise ValueError(f"attention_mask row {i} has holes; only left or right padding is supported")
        rows.append(ids[i, lo:hi])
    return rows


def _eos_set(model, eos_token_id, vocab_size: int) -> frozenset[int]:
    """The stop ids: eos_token_id, else the model's generation_config's. An id outside the
    vocabulary is refused: it can never be sampled, so the rows would silently never stop."""
    where = "eos_token_id"
    if eos_token_id is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos_token_id, where = getattr(gen_cfg, "eos_token_id", None), "the model's generation_config.eos_token_id"
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if validate.is_int(eos_token_id) else eos_token_id
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(validate.is_int(e) for e in ids):
        raise TypeError(f"{where} must be an int or a list of ints, got {eos_token_id!r}")
    outside = sorted(int(e) for e in ids if not 0 <= e < vocab_size)
    if outside:
        raise ValueError(f"{where} {outside} lies outside the vocabulary [0, {vocab_size}): no row could ever stop "
                         "on it; pass the tokenizer's eos id (or eos_token_id=[] for none)")
    return frozenset(int(e) for e in ids)


def _pad_id(model, pad_token_id, eos: frozenset[int]) -> int:
    if pad_token_id is not None:
        return validate.need_int("pad_token_id", pad_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return min(eos) if eos else 0


def generate(
    model,
    input_ids,
    *,
    steering: SVGT | None | list = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    engine="fast",
    stream: bool = False,
) -> GenerationOutput | GenerationStream:
    """Generate with a Hugging Face causal LM, optionally steered by SVGT.

    input_ids: [B, P] or [P] token ids (with attention_mask for left/right padding), a list of
        token lists (ragged), or text (str or list of str) together with `tokenizer`. Tensors may
        be on the CPU or on the model's device.
    steering: None, `svgt_fast.SVGT(module, ...)` for every row, or a list with one SVGT-or-None
        per prompt (per-request steering: rows mix modules of this backbone, K, strengths,
        intervals, refresh modes and policies; each row's tokens equal running it alone).
    temperature 0 is greedy; otherwise top_k (0 = off) then top_p filter, and a seeded draw
        (row i uses seed + i, so a row's tokens do not depend on the rest of the batch).
    engine: "fast" (default: an Engine sized for this call, cached per model), an
        `svgt_fast.Engine` to reuse, or "reference" (the eager oracle of DESIGN §1, which
        re-computes the whole sequence every step).
    stream: False returns a GenerationOutput. True returns a GenerationStream: iterate it for a
        StreamEvent per step (each row's new token and, with a tokenizer, its text delta), then a
        final event carrying the GenerationOutput (also `stream.output`); see streaming.py. The
        inputs are checked at the call; the work runs as the stream is iterated. The reference
        engine computes everything at the first step, then hands the steps out.
    Thread safety: calls on one Engine (also the cached one) run one at a time; see guard.py.
    """
    from .engine import Engine

    if not isinstance(engine, Engine) and (not isinstance(engine, str) or engine not in ENGINES):
        raise ValueError(f"engine must be one of {ENGINES} or an svgt_fast.Engine, got {engine!r}")
    if isinstance(engine, Engine) and engine.model is not model:
        raise ValueError("the Engine given was built for another model")
    if not validate.is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}")
    if tokenizer is not None and not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (callable, with .decode), got {type(tokenizer).__name__}")
    if not (steering is None or isinstance(steering, (SVGT, REControl, ConVA, NeVA, list, tuple))):
        raise TypeError(f"steering must be None, svgt_fast.SVGT / REControl / ConVA / NeVA(...) or a list of them, "
                        f"got {type(steering).__name__}")
    sampling = SamplingParams(validate.need_number("temperature", temperature), validate.need_number("top_p", top_p),
                              validate.need_int("top_k", top_k))
    if seed is None:
        if not sampling.greedy:
            raise ValueError("sampling (temperature > 0) needs seed=... so that results are reproducible")
        seed = 0
    validate.need_int("seed", seed, -validate.MAX_SEED, validate.MAX_SEED)
    info = backbone_info(model)
    device, _ = validate.model_device(model)
    ids, mask = _as_batch(input_ids, tokenizer, attention_mask, device)
    plan = SteeringPlan.build(steering, ids.shape[0])  # one steering-or-None per row
    for g in plan.groups:
        g.steering.module.check_backbone(model)
    for g in plan.edits:
        g.steering.value_fn.check_backbone(model)
    for g in plan.layer_groups:
        g.steering.vectors.check_backbone(model)
    for g in plan.mlp_groups:
        g.steering.neurons.check_backbone(model)
    hi_id, lo_id = torch.stack([ids.max(), ids.min()]).tolist()  # one host read
    if hi_id >= info.vocab_size or lo_id < 0:
        raise ValueError(f"input_ids hold ids outside the vocabulary [0, {info.vocab_size})")
    prompts = _unpad(ids, mask)
    for i, (p, st) in enumerate(zip(prompts, plan.per_row)):
        extra = st.n_tokens if isinstance(st, SVGT) else 0
        check_total_length(info, p.shape[0] + extra + max_new_tokens, f"row {i} (prompt {p.shape[0]} tokens)")
    eos = _eos_set(model, eos_token_id, info.vocab_size)
    pad = _pad_id(model, pad_token_id, eos)
    if not isinstance(input_ids, torch.Tensor):  # the padding of ragged lists and text is ours: pad, as after EOS
        ids = ids.masked_fill(mask == 0, pad)

    t0 = time.perf_counter()
    for g in plan.groups:
        g.steering.module.to(device)
    for g in plan.edits:
        g.steering.value_fn.to(device)
    for g in plan.layer_groups:
        g.steering.vectors.to(device)
    finish = _Finisher(ids, pad, tokenizer, "reference" if engine == "reference" else "fast", eos, max_new_tokens)
    if engine == "reference":
        run = lambda: _reference(model, prompts, plan, max_new_tokens, sampling, seed, eos, pad, device)  # noqa: E731
        if stream:
            return GenerationStream(_reference_steps(run, finish), len(prompts), eos, tokenizer)
        return finish(*run(), elapsed=time.perf_counter() - t0)
    eng = engine if isinstance(engine, Engine) else _cached_engine(
        model, len(prompts), max(p.shape[0] for p in prompts) + max_new_tokens, plan)
    seeds = seed + torch.arange(len(prompts), dtype=torch.int64)
    result = eng.generate(prompts, steering=list(plan.per_row), max_new_tokens=max_new_tokens, sampling=sampling,
                          row_seeds=seeds, eos_ids=eos, pad_id=pad, stream=stream)
    if stream:
        return GenerationStream(_fast_steps(result, finish), len(prompts), eos, tokenizer)
    new, counts, timings = result
    return finish(new, counts, timings.pop("trigger_counts", None), timings, elapsed=time.perf_counter() - t0)


def finish_reason(tokens: list[int], eos: frozenset[int], max_new_tokens: int) -> str:
    """Why a row with these new tokens ended (both engines stop a row at its first non-finite
    logits without a token, so a short row that does not end in EOS stopped there)."""
    if tokens and tokens[-1] in eos:
        return "stop"
    return "length" if len(tokens) >= max_new_tokens else "nonfinite"


class _Finisher:
    """Builds the GenerationOutput of a call from its new tokens."""

    def __init__(self, ids, pad: int, tokenizer, engine: str, eos: frozenset[int], max_new_tokens: int):
        self.ids, self.pad, self.tokenizer, self.engine = ids, pad, tokenizer, engine
        self.eos, self.max_new_tokens = eos, max_new_tokens

    def __call__(self, new, counts, triggers, timings, elapsed: float | None = None) -> GenerationOutput:
        B = self.ids.shape[0]
        rows = new.tolist()
        reasons = [finish_reason(rows[i][: int(counts[i])], self.eos, self.max_new_tokens) for i in range(B)]
        stopped = [i for i, r in enumerate(reasons) if r == "nonfinite"]
        if stopped:
            where = ", ".join(f"row {i} after {int(counts[i])} tokens" for i in stopped[:8])
            warnings.warn(f"generation stopped early, the next-token logits not finite (NaN or inf): {where}"
                          f"{' ...' if len(stopped) > 8 else ''}; a steering strength too large "
                          f"(gradient_step_size, NeVA strength) or non-finite weights do this "
                          f"(finish_reasons says 'nonfinite')", RuntimeWarning, stacklevel=3)
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(new[i, : int(counts[i])].tolist(), skip_special_tokens=True)
                     for i in range(B)]
        timings = dict(timings, engine=self.engine, tokens=int(counts.sum()))
        if elapsed is not None:
            timings["total_s"] = elapsed
        return GenerationOutput(
            sequences=torch.cat([self.ids, new.to(self.ids.device)], dim=1),
            new_tokens=new,
            num_new_tokens=counts,
            texts=texts,
            timings=timings,
            trigger_counts=torch.tensor(triggers if triggers is not None else [0] * B, dtype=torch.long),
            finish_reasons=reasons,
        )


def _fast_steps(steps, finish):
    new, counts, timings = yield from steps
    return finish(new, counts, timings.pop("trigger_counts", None), timings)


def _reference_steps(run, finish):
    new, counts, triggers, timings = run()
    ends = counts.tolist()
    for t in range(new.shape[1]):
        # past a row's end its pad reads as "finished" only after an EOS: mark a row that stopped
        # at non-finite logits with NONFINITE, as the fast engine's stream does
        yield t, [v if t < n else NONFINITE for v, n in zip(new[:, t].tolist(), ends)]
    return finish(new, counts, triggers, timings)


def _reference(model, prompts, plan, max_new_tokens, sampling, seed, eos, pad, device):
    """The eager oracle: each row alone with its own steering (the definition the fast engine's
    mixed batches are tested against). Returns (new [B, N], counts [B], triggers, timings)."""
    from .conva import generate_row_conva
    from .neva import generate_row_neva
    from .re_control import generate_row_recontrol
    from .reference import generate_row
    from .reference_modes import generate_row_cached

    # The oracle re-computes everything (refresh "exact"); the approximate refresh modes have
    # their own eager reference, which keeps the stale K/V those modes define. The hook-based
    # references register hooks on the shared model: one reference call per model at a time.
    outs, triggers = [], []
    with _model_lock(model):
        for i, (p, steering) in enumerate(zip(prompts, plan.per_row)):
            kw = dict(max_new_tokens=max_new_tokens, sampling=sampling, row_seed=seed + i, eos_ids=eos)
            cached = isinstance(steering, SVGT) and (steering.refresh != "exact" or steering.policy != "always")
            if isinstance(steering, NeVA):
                outs.append(generate_row_neva(model, p, steering=steering, **kw))
                triggers.append(0)
            elif isinstance(steering, ConVA):
                outs.append(generate_row_conva(model, p, steering=steering, **kw))
                triggers.append(0)
            elif isinstance(steering, REControl):
                outs.append(generate_row_recontrol(model, p, steering=steering, **kw))
                triggers.append(0)
            elif cached:
                stats = {}
                outs.append(generate_row_cached(model, p, steering=steering, stats=stats, **kw))
                triggers.append(stats["triggers"])
            else:
                outs.append(generate_row(model, p, steering=steering, **kw))
                # policy "always": the prompt, then every refresh_interval-th step that is taken
                # (a row stopped at non-finite logits took one step more than it has tokens)
                n = len(outs[-1]) + (finish_reason(outs[-1], eos, max_new_tokens) == "nonfinite")
                triggers.append(0 if steering is None else 1 + (n - 1) // steering.refresh_interval)
    if max_new_tokens == 0:
        triggers = [0] * len(prompts)  # nothing generated: no prefill ran in the fast engine either
    width = max((len(o) for o in outs), default=0)
    new = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    for i, o in enumerate(outs):
        if o:
            new[i, : len(o)] = torch.tensor(o, dtype=torch.long, device=device)
    counts = torch.tensor([len(o) for o in outs], dtype=torch.long)
    return new, counts, triggers, {"steps": width}


_ENGINES = weakref.WeakKeyDictionary()
_MODEL_LOCKS = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()  # guards the two dictionaries above


def _model_lock(model) -> threading.Lock:
    with _REGISTRY_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def _cached_engine(model, batch: int, seq_len: int, plan):
    """One Engine per model, grown (never shrunk) to the largest request seen, and built anew
    when the model's parameters were replaced, moved or cast. A call still running on a
    replaced engine keeps it alive until it ends."""
    from .engine import Engine

    with _REGISTRY_LOCK:
        eng = _ENGINES.get(model)
        k = max(plan.kmax, 1)
        if (eng is None or eng.max_batch < batch or eng.max_seq_len < seq_len or eng.kmax < k
                or eng.w.replaced() is not None):  # weights replaced, model moved or cast: read them anew
            b = max(batch, eng.max_batch if eng else 1)
            s = max(seq_len, eng.max_seq_len if eng else 2)
            eng = None  # free the old caches first
            _ENGINES.pop(model, None)
            eng = Engine(model, max_batch=b, max_seq_len=s, max_bridge_tokens=16)
            _ENGINES[model] = eng
        return eng
