"""Three-stage SVGT training on a frozen backbone (issue 7): `train_svgt`.

Data: JSONL (one object per line) or a list of dicts, each with
    "prompt":   str | [int]   the text the model is given, exactly as it will be prompted
                              (chat template applied); tokenized with the tokenizer's defaults
    "response": str | [int]   the continuation; tokenized without special tokens, and the EOS
                              id appended unless it already ends with it (append_eos=True)
    "label":    0 | 1         1 = the response is harmful (the value is violated), 0 = safe
(other keys are ignored). Every stage reads all rows except stage 3, which reads the safe ones.

The stages (the authors' recipe, DESIGN §1 names; d = backbone width, d_v = value dim,
e = extract layer, hiddens h = hidden_states[e + 1] of the frozen backbone):
1. Unconditional value learning: response hiddens -> response_proj (Linear d->d_v, GELU) -> the
   value transformer's self-attention layers (key padding) -> last valid position -> aggregate
   -> discriminator; BCE-with-logits against the label. Trains those and the discriminator.
2. Prompt-conditioned value learning: p = LN(prompt_proj(prompt h)), r = LN(response_proj(resp
   h)) (LN without affine), cross-attention of r over p (key padding), z = r + cross_scale ·
   cross_norm(attn) (cross_scale starts at 3.0), then as stage 1; BCE. Starts from stage 1.
3. Bridge generator: value transformer and discriminator frozen. Trigger h_t -> z =
   value(h_t) (the inference path) -> δz (gradient delta) -> bridge = generator(h_t, δz); the
   upper stack runs over [prompt ; K bridge ; response] (bridge injected as the input of layer
   e + 1, positions contiguous) and the loss is
       lambda_ce · CE(response tokens)            on safe rows only
     + lambda_safe · mean(softplus(s) + 2 relu(s)),  s = discriminator(stage-2 value of the
                     prompt and response states after layer e + 1, i.e. with the bridge seen)
     + lambda_reg · norm regulariser (VLP: relu(|mean‖b‖ / mean‖h_t‖ − 1| − 0.2);
                     MLP: relu(mean‖adjustment‖ − 0.1 · mean prompt-state norm));
     + lambda_unlikely · value-guided unlikelihood on harmful rows (ours, below);
   the generator's gradients are clipped to norm 1.0.
The training-only parameters of stages 1-2 (response_proj, cross_attn, cross_norm,
cross_scale) live in `TrainingValueModel`, are kept in the checkpoints, and are not part of the
inference artifact (out_dir/svgt, an `SVGTModule`).

Departures from the authors' recipe (ours, because they make steering work with our defaults):
- Stage 3 draws the trigger from the response too (probability `response_trigger_p`, uniform
  over the response tokens that have a successor), not only from the last prompt token: with
  dynamic anchors (`SVGT(trigger="current")`) every refresh reads a response token, so the
  generator must have seen such triggers. The CE then counts only the tokens after the
  trigger — the bridge made there cannot have influenced the earlier ones at inference.
- Stage 2 also trains the inference path itself (`lambda_trigger`): BCE of
  discriminator(value(h_j)) against the row's label at every prefix j of the row — the last
  prompt token and each response token (`trigger_positions="all"`, the default; "sampled",
  the last prompt token plus one random j per row, is what checkpoints written before the
  option existed used). In the authors' recipe the 1-token path (prompt_proj on the trigger)
  is never fitted to labels, so the score s that gates δz and the sparse policy is
  uncalibrated; with this term s > 0 reads
  "this prefix is headed to (or already in) harm". Every prefix rather than one: on the world
  backbone (N=1000 held-out prompts, benchmarks/NOTES.md) the sparse policy at threshold 0.5
  then cuts the harmful rate by 68 % at +1.5 % benign perplexity, against 67 % at +21 % for
  the "sampled" module under the always policy (both seed 0; training seeds spread widely —
  0.13-0.41 harmful on validation prompts — so the shipped default is a seed picked on
  validation prompts: NOTES.md, "Third round").
- prompt_proj and response_proj start standardised: the per-dimension mean and std of the
  frozen backbone's states (512 rows) are folded into their first linear layer
  (`standardize_projections`); the authors' random init let the 1-token path collapse to a
  constant score on a trained backbone.
- Stage 3 also reads the harmful rows (when lambda_unlikely > 0): an unlikelihood term
  −log(1 − p(token)) on their response tokens after the trigger, each weighted by how much the
  frozen value module's harm probability sigmoid(s(value(h_j))) rises at that token (h_j the
  extract-layer state after it, relu of the rise). The CE on safe rows alone teaches "what safe
  text looks like" but gives little signal at the few tokens where a response turns harmful;
  this term pushes exactly those down. On the world backbone (benchmarks/NOTES.md, "Efficacy
  recipe"), extract layer 1: with it the harmful rate fell by 67 % (N=1000, "sampled"
  triggers, always policy), without it by about half (to 27.5 %, N=200); at extract layer 3
  (two layers above the bridge) with it by 14 %. Its cost: the steered model ends responses
  earlier (EOS after the first sentence more often), most of the benign-perplexity rise.
- No dropout (the inference modules have none); AdamW with a linear warm-up and a cosine
  decay to 10 % of the stage's learning rate; mean-reduced losses.

Checkpoints: out_dir/checkpoint/ (config.json + model.safetensors, format
"svgt_fast.svgt_training"): every weight of the training model, the AdamW moments of the
running stage and, in the JSON, the stage, the step, the arguments, the backbone's and the
data's fingerprints and the loss log. Written every `checkpoint_every` steps and at the end of
each stage (also copied to out_dir/stage{1,2,3}/). Each step's batch and triggers are drawn
from a generator seeded by (seed, stage, step), so `resume=True` continues bit for bit (same
device and thread count). The inference artifact is out_dir/svgt/.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import validate
from .backbone import backbone_info, backbone_parts
from .jsonl_rows import encode_pair, read_rows
from .layers import MultiHeadAttention
from .reference import _run_layers
from .value_module import SVGTConfig, SVGTModule, _delta_from, _EncoderStack, load_artifact, save_artifact

FORMAT_NAME = "svgt_fast.svgt_training"
CHECKPOINT_DIR, ARTIFACT_DIR = "checkpoint", "svgt"


@dataclass
class TrainArgs:
    """Hyper-parameters of `train_svgt` (saved in every checkpoint)."""

    stage1_steps: int = 300
    stage2_steps: int = 1000
    stage3_steps: int = 2000
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    stage3_lr: float = 3e-3
    batch_size: int = 32
    lambda_ce: float = 1.0
    lambda_safe: float = 0.5
    lambda_reg: float = 0.1
    lambda_trigger: float = 1.0
    lambda_unlikely: float = 1.0
    trigger_positions: str = "all"
    response_trigger_p: float = 0.5
    gradient_step_size: float = 1.0
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("stage1_steps", "stage2_steps", "stage3_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("stage1_lr", "stage2_lr", "stage3_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lambda_ce", "lambda_safe", "lambda_reg", "lambda_trigger", "lambda_unlikely", "weight_decay",
                     "gradient_step_size"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.trigger_positions not in ("sampled", "all"):
            raise ValueError(f"trigger_positions must be 'sampled' or 'all', got {self.trigger_positions!r}")
        if not 0.0 <= self.response_trigger_p <= 1.0:
            raise ValueError(f"response_trigger_p must lie in [0, 1], got {self.response_trigger_p}")

    def steps(self, stage: int) -> int:
        return getattr(self, f"stage{stage}_steps")

    def lr(self, stage: int) -> float:
        return getattr(self, f"stage{stage}_lr")


# ---- data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    label: int


def read_svgt_data(data, tokenizer=None, append_eos: bool = True) -> list[Example]:
    """Rows (JSONL path or list of dicts; schema in the module docstring) -> token examples.
    Raises ValueError naming the row (file:line, or "row i") for a missing field, a bad label or
    text that cannot be encoded (svgt_fast.jsonl_rows)."""
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    out = []
    for where, r in read_rows(data, ("prompt", "response", "label")):
        label = r["label"]
        if type(label) not in (int, bool) or label not in (0, 1):
            raise ValueError(f"{where}: label must be 0 (safe) or 1 (harmful), got {label!r}")
        prompt, response = encode_pair(r, where, tokenizer)
        if eos is not None and response[-1] != eos:
            response = response + [eos]
        out.append(Example(tuple(prompt), tuple(response), int(label)))
    return out


def _fingerprint_data(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.response, ex.label]).encode())
    return h.hexdigest()


def backbone_fingerprint(model) -> dict:
    """Shape facts and a digest of a few weights, to refuse a checkpoint of another backbone."""
    info = backbone_info(model)
    inner, layers, head = backbone_parts(model)
    h = hashlib.sha256()
    for t in (inner.embed_tokens.weight[:256], inner.norm.weight, head.weight[:256], layers[-1].mlp.down_proj.weight[:16]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {"model_type": info.model_type, "hidden_size": info.hidden_size, "num_layers": info.num_layers,
            "vocab_size": info.vocab_size, "weights_sha256": h.hexdigest()}


# ---- the training model ------------------------------------------------------------------------
class TrainingValueModel(nn.Module):
    """An SVGTModule plus the parameters only stages 1-2 use (not in the inference artifact)."""

    TRAINING_ONLY = ("response_proj.", "cross_attn.", "cross_norm.", "cross_scale")

    def __init__(self, module: SVGTModule):
        super().__init__()
        c = module.config
        self.module = module
        self.response_proj = nn.Sequential(nn.Linear(c.hidden_size, c.value_dim), nn.GELU())
        self.cross_attn = MultiHeadAttention(c.value_dim, c.n_heads)
        self.cross_norm = nn.LayerNorm(c.value_dim, eps=c.layer_norm_eps)
        self.cross_scale = nn.Parameter(torch.full((1,), 3.0))

    def _encode(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_v], valid [B, T] -> z [B, d_v]: self-attention layers (key padding), the
        last valid position, aggregate."""
        vt = self.module.value_transformer
        for layer in vt.self_attn_layers:
            x = layer(x, valid[:, None, :])
        x = x[torch.arange(x.shape[0], device=x.device), valid.sum(1) - 1]
        return vt.aggregate(x[:, None])[:, 0] if isinstance(vt.aggregate, _EncoderStack) else vt.aggregate(x)

    def unconditional(self, resp: torch.Tensor, resp_valid: torch.Tensor) -> torch.Tensor:
        """Stage 1: response states [B, R, d] -> z [B, d_v]."""
        return self._encode(self.response_proj(resp), resp_valid)

    def conditional(self, prompt, prompt_valid, resp, resp_valid) -> torch.Tensor:
        """Stage 2: prompt [B, P, d] and response [B, R, d] states -> z [B, d_v]."""
        p = F.layer_norm(self.module.value_transformer.prompt_proj(prompt), (self.module.config.value_dim,))
        r = F.layer_norm(self.response_proj(resp), (self.module.config.value_dim,))
        att = self.cross_attn(r, p, prompt_valid[:, None, :])
        return self._encode(r + self.cross_scale * self.cross_norm(att), resp_valid)

    def stage_parameters(self, stage: int) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) trained in `stage` (1, 2 or 3)."""
        named = list(self.named_parameters())
        if stage == 1:
            skip = ("module.generator.", "module.value_transformer.prompt_proj.", "cross_", "module.value_transformer.pooling")
            return [(n, p) for n, p in named if not n.startswith(skip)]
        if stage == 2:
            return [(n, p) for n, p in named if not n.startswith("module.generator.")]
        return [(n, p) for n, p in named if n.startswith("module.generator.")]


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class _Batch:
    ids: torch.Tensor       # [B, T] prompt then response, right padding
    P: torch.Tensor         # [B] prompt lengths
    R: torch.Tensor         # [B] response lengths (EOS included)
    label: torch.Tensor     # [B] float
    trigger: torch.Tensor   # [B] index of the trigger token (P - 1 or a response position)


def _make_batch(examples, pool: list[int], stage: int, step: int, args: TrainArgs, pad: int, device) -> _Batch:
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + stage * 100_003 + step)
    pick = torch.randint(len(pool), (args.batch_size,), generator=g).tolist()
    rows = [examples[pool[i]] for i in pick]
    T = max(len(r.prompt) + len(r.response) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.prompt) + len(r.response)] = torch.tensor(r.prompt + r.response)
    P = torch.tensor([len(r.prompt) for r in rows])
    R = torch.tensor([len(r.response) for r in rows])
    # Trigger: the last prompt token, or (response_trigger_p) a response token that has a successor.
    use_resp = (torch.rand(len(rows), generator=g) < args.response_trigger_p) & (R >= 2)
    offset = (torch.rand(len(rows), generator=g) * (R - 1).clamp_min(1)).long()
    trigger = torch.where(use_resp, P + offset, P - 1)
    label = torch.tensor([float(r.label) for r in rows])
    return _Batch(ids.to(device), P.to(device), R.to(device), label.to(device), trigger.to(device))


def _lower(model, ids: torch.Tensor, e: int) -> torch.Tensor:
    """Extract-layer states [B, T, d] of right-padded ids (causal, so padding never leaks in)."""
    inner, _, _ = backbone_parts(model)
    with torch.no_grad():
        return _run_layers(model, inner.embed_tokens(ids), range(e + 1))


def _split(h: torch.Tensor, P: torch.Tensor, R: torch.Tensor, resp_start: torch.Tensor):
    """(prompt [B, Pmax, d], prompt_valid, response [B, Rmax, d], resp_valid) of states h whose
    response of row b starts at resp_start[b]."""
    ar_p = torch.arange(int(P.max()), device=h.device)
    ar_r = torch.arange(int(R.max()), device=h.device)
    idx = (resp_start[:, None] + ar_r).clamp_max(h.shape[1] - 1)
    resp = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
    return h[:, : ar_p.numel()], ar_p < P[:, None], resp, ar_r < R[:, None]


# ---- the three losses --------------------------------------------------------------------------
def _stage12_loss(tm: TrainingValueModel, model, b: _Batch, stage: int, args: TrainArgs) -> dict:
    e = tm.module.config.extract_layer
    h = _lower(model, b.ids, e).float()
    prompt, pv, resp, rv = _split(h, b.P, b.R, b.P)
    z = tm.unconditional(resp, rv) if stage == 1 else tm.conditional(prompt, pv, resp, rv)
    disc = tm.module.discriminator
    logit = disc(z)
    out = {"bce": F.binary_cross_entropy_with_logits(logit, b.label)}
    out["acc"] = ((logit > 0).float() == b.label).float().mean().detach()
    loss = out["bce"]
    if stage == 2 and args.lambda_trigger > 0:
        # Both kinds of trigger every row: the last prompt token (the prefill bridge reads it)
        # and the row's sampled trigger (a response token for response_trigger_p of the rows).
        rows = torch.arange(h.shape[0], device=h.device)
        if args.trigger_positions == "all":
            # Every position from the last prompt token to the response's last: a value per prefix.
            valid = torch.cat([torch.ones_like(rv[:, :1]), rv], 1)  # [B, 1 + Rmax]
            states = torch.cat([h[rows, b.P - 1][:, None], resp], 1)[valid]
            logit_t = disc(tm.module.value(states))
            out["trigger_bce"] = F.binary_cross_entropy_with_logits(logit_t, b.label[:, None].expand_as(valid)[valid])
        else:
            h_t = torch.cat([h[rows, b.P - 1], h[rows, b.trigger]])
            out["trigger_bce"] = F.binary_cross_entropy_with_logits(disc(tm.module.value(h_t)), b.label.repeat(2))
        loss = loss + args.lambda_trigger * out["trigger_bce"]
    out["loss"] = loss
    return out


def _stage3_loss(tm: TrainingValueModel, model, b: _Batch, args: TrainArgs) -> dict:
    module, c = tm.module, tm.module.config
    e, K = c.extract_layer, c.n_intervention_tokens
    inner, layers, head = backbone_parts(model)
    dtype = inner.embed_tokens.weight.dtype
    h = _lower(model, b.ids, e)
    B, T, d = h.shape
    rows = torch.arange(B, device=h.device)
    h_t = h[rows, b.trigger].float()
    with torch.no_grad():  # the value transformer and discriminator are frozen
        z = module.value(h_t)
        s, g = module.discriminator.score_and_grad(z)
        dz = _delta_from(s, g, z, args.gradient_step_size)
    bridge = module.generator(h_t, dz)  # [B, K, d]
    # [prompt ; bridge ; response] per row, right padded: an index map into cat(h, bridge).
    t = torch.arange(T + K, device=h.device)[None]
    P, R = b.P[:, None], b.R[:, None]
    src = torch.where(t < P, t, torch.where(t < P + K, T + t - P, (t - K).clamp_min(0)))
    src = torch.where(t < P + K + R, src, torch.zeros_like(src))  # padding reads row 0: never attended
    x = torch.cat([h, bridge.to(dtype)], 1).gather(1, src[..., None].expand(-1, -1, d))
    y1 = _run_layers(model, x, range(e + 1, e + 2))  # output of layer e + 1: the states the bridge reached
    y = _run_layers(model, y1, range(e + 2, len(layers))) if e + 2 < len(layers) else y1
    # CE: response token i sits at P + K + i and is read from P + K + i - 1; only the tokens
    # after the trigger count (the bridge of trigger j cannot have shaped tokens <= j).
    Rmax = int(b.R.max())
    i = torch.arange(Rmax, device=h.device)[None]
    after = (i < R) & (b.P[:, None] + i > b.trigger[:, None])
    safe_row = b.label[:, None] == 0
    pos = (P + K + i - 1).clamp_max(T + K - 1)
    logits = head(inner.norm(y.gather(1, pos[..., None].expand(-1, -1, d)))).float()
    target = b.ids.gather(1, (b.P[:, None] + i).clamp_max(T - 1))
    logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]  # [B, Rmax]
    ce_mask = after & safe_row
    ce = -(logp * ce_mask).sum() / ce_mask.sum().clamp_min(1)
    # Value-guided unlikelihood (ours, module docstring) on the harmful rows: the tokens at which
    # the frozen value module's harm probability rises, weighted by the rise.
    n_harm = int((~safe_row).sum())
    if args.lambda_unlikely > 0 and n_harm:
        with torch.no_grad():
            idx = (b.P[:, None] - 1 + torch.arange(Rmax + 1, device=h.device)[None]).clamp_max(T - 1)
            states = h.gather(1, idx[..., None].expand(-1, -1, d)).float().reshape(-1, d)
            p_harm = torch.sigmoid(module.discriminator(module.value(states))).view(B, Rmax + 1)
            w = F.relu(p_harm[:, 1:] - p_harm[:, :-1]) * (after & ~safe_row)
        unlikely = (w * -torch.log1p(-logp.exp().clamp_max(1 - 1e-6))).sum() / n_harm
    else:
        unlikely = logp.new_zeros(())
    # Safety: the stage-2 value of the prompt and response states after layer e + 1 (safe rows).
    prompt, pv, resp, rv = _split(y1.float(), b.P, b.R, b.P + K)
    score = module.discriminator(tm.conditional(prompt, pv, resp, rv))
    sm = safe_row[:, 0].float()
    safe = ((F.softplus(score) + 2.0 * F.relu(score)) * sm).sum() / sm.sum().clamp_min(1)
    if c.generator == "vlp":
        ratio = bridge.norm(dim=-1).mean() / (h_t.norm(dim=-1).mean() + 1e-8)
        reg = F.relu((ratio - 1.0).abs() - 0.2)
    else:
        gen = module.generator
        a = F.softplus(gen.gating_alpha)
        adj = (bridge - h_t[:, None]) / a  # the generator's tokens before the gate
        prompt_norm = (h[:, : pv.shape[1]].float().norm(dim=-1) * pv).sum() / pv.sum()
        reg = F.relu(adj.norm(dim=-1).mean() - 0.1 * prompt_norm)
    loss = args.lambda_ce * ce + args.lambda_safe * safe + args.lambda_reg * reg + args.lambda_unlikely * unlikely
    return {"loss": loss, "ce": ce, "safe": safe, "reg": reg, "unlikely": unlikely,
            "score": ((score * sm).sum() / sm.sum().clamp_min(1)).detach()}


@torch.no_grad()
def standardize_projections(tm: TrainingValueModel, model, examples: list[Example], pad: int, seed: int,
                            n_rows: int = 512) -> None:
    """Fold the per-dimension mean and std of the extract-layer states into the first linear
    layer of prompt_proj (states of trigger positions: last prompt token and response tokens)
    and response_proj (response tokens), so both start on standardised inputs. The states of a
    trained backbone share a large common component with small, unevenly scaled variations
    around it; without this the 1-token value path tends to collapse to a constant score."""
    e = tm.module.config.extract_layer
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(examples), generator=g)[:n_rows].tolist()
    dev = next(tm.parameters()).device
    trig, resp = [], []
    for lo in range(0, len(pick), 64):
        rows = [examples[i] for i in pick[lo:lo + 64]]
        T = max(len(r.prompt) + len(r.response) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt) + len(r.response)] = torch.tensor(r.prompt + r.response)
        h = _lower(model, ids.to(dev), e).float()
        for i, r in enumerate(rows):
            P, R = len(r.prompt), len(r.response)
            trig.append(h[i, P - 1:P + R])
            resp.append(h[i, P:P + R])
    for proj, states in ((tm.module.value_transformer.prompt_proj[0], torch.cat(trig)),
                         (tm.response_proj[0], torch.cat(resp))):
        mu, sd = states.mean(0), states.std(0).clamp_min(1e-5)
        proj.weight.div_(sd)
        proj.bias.sub_(proj.weight @ mu)


def _lr_at(base: float, step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


# ---- checkpoints -------------------------------------------------------------------------------
def _save_checkpoint(directory: str, tm: TrainingValueModel, meta: dict, opt_state: dict | None) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in tm.state_dict().items()}
    if opt_state is not None:
        for name, st in opt_state.items():
            tensors[f"optim.{name}.exp_avg"] = st["exp_avg"].detach().contiguous().cpu()
            tensors[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().contiguous().cpu()
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_artifact(tmp, FORMAT_NAME, meta, tensors)
    old = directory + ".old"
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> dict:
    params = opt.param_groups[0]["params"]
    out = {}
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if st:
            out[name] = st
    return out


def _restore_optimizer(opt, names: list[str], tensors: dict, step_count: int) -> None:
    params = opt.param_groups[0]["params"]
    for name, p in zip(names, params):
        key = f"optim.{name}.exp_avg"
        if key not in tensors:
            raise ValueError(f"checkpoint lacks the optimizer state of {name}")
        opt.state[p] = {"step": torch.tensor(float(step_count)), "exp_avg": tensors[key].to(p.device),
                        "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(p.device)}


@contextlib.contextmanager
def _frozen_backbone(model):
    """Backbone in eval mode, no parameter gradients, eager attention (its backward is several
    times faster than SDPA's at these sizes on CPU); everything restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    impl = getattr(model.config, "_attn_implementation", None)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
        if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)


def load_checkpoint(directory) -> tuple[dict, dict]:
    """(meta, tensors) of a training checkpoint directory (out_dir/checkpoint or a stage dir)."""
    return load_artifact(directory, FORMAT_NAME, "the training state's safetensors weights")


# Arguments added after checkpoints were written: the value that reproduces what those ran.
ARGS_BEFORE_THEY_EXISTED = {"trigger_positions": "sampled"}


def _check_resume(meta: dict, expect: dict, directory: str) -> None:
    if meta["backbone"] != expect["backbone"]:
        raise ValueError(f"{directory} was trained on another backbone ({meta['backbone']}, this one is "
                         f"{expect['backbone']}); use another out_dir or resume=False")
    if meta["svgt_config"] != expect["svgt_config"]:
        diff = sorted(k for k in expect["svgt_config"] if meta["svgt_config"].get(k) != expect["svgt_config"][k])
        raise ValueError(f"{directory} holds a value module of another config (fields {diff} differ); "
                         f"use another out_dir or resume=False")
    saved_args = {**ARGS_BEFORE_THEY_EXISTED, **meta["args"]}
    if saved_args != expect["args"]:
        diff = sorted(k for k in expect["args"] if saved_args.get(k) != expect["args"][k])
        raise ValueError(f"{directory} was written with other training arguments ({diff} differ); "
                         f"pass the same ones to resume, or resume=False")
    if meta["data"] != expect["data"]:
        raise ValueError(f"{directory} was trained on other data; use another out_dir or resume=False")


# ---- the entry point ---------------------------------------------------------------------------
def train_svgt(model, tokenizer, data, out_dir, *, config: dict | None = None, stage1_steps: int = 300,
               stage2_steps: int = 1000, stage3_steps: int = 2000, stage1_lr: float = 1e-3, stage2_lr: float = 1e-3,
               stage3_lr: float = 3e-3, batch_size: int = 32, lambda_ce: float = 1.0, lambda_safe: float = 0.5,
               lambda_reg: float = 0.1, lambda_trigger: float = 1.0, lambda_unlikely: float = 1.0,
               trigger_positions: str = "all",
               response_trigger_p: float = 0.5,
               gradient_step_size: float = 1.0, grad_clip: float = 1.0, weight_decay: float = 0.01, seed: int = 0,
               resume: bool = True, progress: bool = True, device=None, checkpoint_every: int = 200,
               append_eos: bool = True, stop_after: int | None = None) -> SVGTModule:
    """Train an SVGT value module for the frozen `model` (a HF causal LM, moved to `device` when
    given) on `data` (module docstring: schema, stages, departures, checkpoints) and write the
    inference artifact to out_dir/svgt. Returns the SVGTModule (eval mode, fp32, on the device).

    config: SVGTConfig overrides (n_intervention_tokens, value_dim, generator, extract_layer, ...).
    stage*_steps / stage*_lr / batch_size / lambda_*: the recipe's knobs (0 steps skips a stage).
    resume: continue from out_dir/checkpoint when it exists (refused with a ValueError when it
        belongs to another backbone, config, data or arguments); False starts afresh.
    stop_after: stop (checkpoint written) after this many steps in this call — time-sliced
        training; the returned module is then partly trained.
    """
    from tqdm.auto import tqdm

    args = TrainArgs(stage1_steps=stage1_steps, stage2_steps=stage2_steps, stage3_steps=stage3_steps,
                     stage1_lr=stage1_lr, stage2_lr=stage2_lr, stage3_lr=stage3_lr, batch_size=batch_size,
                     lambda_ce=lambda_ce, lambda_safe=lambda_safe, lambda_reg=lambda_reg, lambda_trigger=lambda_trigger,
                     lambda_unlikely=lambda_unlikely,
                     trigger_positions=trigger_positions,
                     response_trigger_p=response_trigger_p, gradient_step_size=gradient_step_size, grad_clip=grad_clip, weight_decay=weight_decay, seed=seed)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    svgt_config = SVGTConfig.for_backbone(model.config, **(config or {}))
    info = backbone_info(model)
    examples = read_svgt_data(data, tokenizer, append_eos)
    longest = max(len(x.prompt) + len(x.response) for x in examples) + svgt_config.n_intervention_tokens
    if longest > info.max_positions:
        raise ValueError(f"a row needs {longest} positions (prompt + K bridge + response), beyond the model's "
                         f"{info.max_positions}; shorten the data")
    safe = [i for i, x in enumerate(examples) if x.label == 0]
    if len(safe) in (0, len(examples)) and (args.stage1_steps or args.stage2_steps):
        raise ValueError("stages 1-2 need rows of both labels (0 = safe, 1 = harmful)")
    if not safe and args.stage3_steps:
        raise ValueError("stage 3 needs safe rows (label 0)")
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    meta = {"svgt_config": svgt_config.to_dict(), "args": asdict(args), "backbone": backbone_fingerprint(model),
            "data": _fingerprint_data(examples), "stage": 1, "step": 0, "history": []}
    out_dir = os.fspath(out_dir)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)

    torch.manual_seed(seed)
    tm = TrainingValueModel(SVGTModule(svgt_config)).float().to(dev)
    tensors = {}
    if resume and os.path.isdir(ckpt_dir):
        saved, tensors = load_checkpoint(ckpt_dir)
        _check_resume(saved, meta, ckpt_dir)
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        validate.check_tensors(state, tm.state_dict(), ckpt_dir, "training model")
        tm.load_state_dict(state)
        meta.update(stage=saved["stage"], step=saved["step"], history=saved["history"])
        if "running" in saved:
            meta["running"] = tuple(saved["running"])
    else:
        with _frozen_backbone(model):
            standardize_projections(tm, model, examples, pad, seed)
    everything = list(range(len(examples)))
    pools = {1: everything, 2: everything, 3: everything if args.lambda_unlikely > 0 else safe}
    done_here = 0
    with _frozen_backbone(model):
        for stage in (1, 2, 3):
            if stage < meta["stage"]:
                continue
            named = tm.stage_parameters(stage)
            names = [n for n, _ in named]
            for p in tm.parameters():
                p.requires_grad_(False)
            for _, p in named:
                p.requires_grad_(True)
            tm.train()
            opt = torch.optim.AdamW([p for _, p in named], lr=args.lr(stage), weight_decay=args.weight_decay)
            total = args.steps(stage)
            if meta["step"] > 0:
                _restore_optimizer(opt, names, tensors, meta["step"])
            bar = tqdm(range(meta["step"], total), desc=f"SVGT stage {stage}/3", disable=not progress,
                       initial=meta["step"], total=total)
            running, n_run = meta.pop("running", ({}, 0))  # the loss window of an interrupted run
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(args.lr(stage), step, total)
                batch = _make_batch(examples, pools[stage], stage, step, args, pad, dev)
                parts = _stage3_loss(tm, model, batch, args) if stage == 3 else _stage12_loss(tm, model, batch, stage, args)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in named], args.grad_clip)
                opt.step()
                meta["step"] = step + 1
                for k, v in parts.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                n_run += 1
                if (step + 1) % 10 == 0 or step + 1 == total:
                    meta["history"].append({"stage": stage, "step": step + 1, **{k: v / n_run for k, v in running.items()}})
                    bar.set_postfix({k: f"{v / n_run:.3f}" for k, v in running.items()})
                    running, n_run = {}, 0
                done_here += 1
                if step + 1 < total and ((step + 1) % checkpoint_every == 0 or done_here == stop_after):
                    _save_checkpoint(ckpt_dir, tm, dict(meta, running=(running, n_run)), _optimizer_state(opt, names))
                if done_here == stop_after and step + 1 < total:
                    bar.close()
                    return tm.module.eval()
            bar.close()
            meta.update(stage=stage + 1, step=0)
            _save_checkpoint(ckpt_dir, tm, meta, None)
            shutil.copytree(ckpt_dir, os.path.join(out_dir, f"stage{stage}"), dirs_exist_ok=True)
            tensors = {}
            if done_here == stop_after and stage < 3:
                return tm.module.eval()
    module = tm.module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    module.save_pretrained(os.path.join(out_dir, ARTIFACT_DIR))
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump({k: meta[k] for k in ("svgt_config", "args", "backbone", "history")}, f, indent=1)
    return module
