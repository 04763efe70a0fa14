"""RE-Control (representation editing with a value function; seed paper 004, DESIGN §3).

A small MLP value function V(h) on the backbone's last hidden state (the final norm's output,
HF's `hidden_states[-1]`) is trained with the Bellman objective; at each decoding step the state
is pushed up the value before the LM head reads it:

    h <- h + step_size * dV/dh(h)        n_steps times, then logits = lm_head(h)

The gradient is derived by hand (no autograd: batched, graph-capturable); the eager reference
(`generate_row_recontrol`) gets it from autograd through a hook on the unmodified HF model.
The edit is not fed back: the KV cache never holds the last layer's output.

Artifact: a directory with config.json (format "svgt_fast.re_control") + model.safetensors.
Data for `fit_re_control`: JSONL (one object per line) or a list of dicts, read by
`svgt_fast.jsonl_rows` like the SVGT trainer's (other keys are ignored):
    {"prompt": str | [int], "response": str | [int], "reward": float}
(text needs a tokenizer). The Bellman targets: the state after the whole response -> reward;
every earlier response state -> gamma * V(next state) under the current value function (fitted
value iteration, the target re-computed each epoch, no gradient through it).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate
from .backbone import backbone_info, backbone_parts, check_fits
from .jsonl_rows import encode_pair, read_rows
from .value_module import CONFIG_FILE, WEIGHTS_FILE, build_on_meta, load_artifact, save_artifact

FORMAT_NAME = "svgt_fast.re_control"
ACTIVATIONS = ("relu", "tanh", "silu")


@dataclass
class REControlConfig:
    hidden_size: int
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    backbone_model_type: str | None = None

    def __post_init__(self):
        validate.check_config_fields(self, "REControlConfig")
        if self.hidden_size <= 0 or not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"REControlConfig: sizes must be > 0, got {self.hidden_size}, {self.hidden_dims}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"REControlConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")


def _act(z: torch.Tensor, kind: str) -> torch.Tensor:
    return F.relu(z) if kind == "relu" else torch.tanh(z) if kind == "tanh" else F.silu(z)


def _act_grad(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return (z > 0).to(z.dtype)
    if kind == "tanh":
        return 1 - torch.tanh(z) ** 2
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class REControlValue(nn.Module):
    """V(h) = w_L · act(... act(W_1 h + b_1) ...) + b_L, one value per row."""

    def __init__(self, config: REControlConfig):
        super().__init__()
        self.config = config
        dims = [config.hidden_size, *config.hidden_dims, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].weight.dtype

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = h.to(self.dtype)
        for lin in self.layers[:-1]:
            a = _act(lin(a), self.config.activation)
        return self.layers[-1](a).squeeze(-1)

    def value_and_grad(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V(h) [B], dV/dh [B, d]) in closed form: back through the layers, the activation
        derivative at each pre-activation."""
        a = h.to(self.dtype)
        pre = []
        for lin in self.layers[:-1]:
            z = lin(a)
            pre.append(z)
            a = _act(z, self.config.activation)
        v = self.layers[-1](a).squeeze(-1)
        g = self.layers[-1].weight.expand(a.shape[0], -1)  # [B, h_last]
        for lin, z in zip(reversed(self.layers[:-1]), reversed(pre)):
            g = (g * _act_grad(z, self.config.activation)) @ lin.weight
        return v, g

    def control(self, h: torch.Tensor, n_steps: int, step_size: float) -> torch.Tensor:
        """h [B, d] after n_steps of gradient ascent on V, in h's dtype (computed in V's)."""
        x = h.to(self.dtype)
        for _ in range(n_steps):
            x = x + step_size * self.value_and_grad(x)[1]
        return x.to(h.dtype)

    # -- artifact and fit ----------------------------------------------------------------------
    def check_backbone(self, model) -> None:
        c = self.config
        check_fits("RE-Control value function", model, hidden_size=c.hidden_size, model_type=c.backbone_model_type)

    def save_pretrained(self, directory) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_artifact(directory, FORMAT_NAME, asdict(self.config), state)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "REControlValue":
        config, state = load_artifact(directory, FORMAT_NAME, "the value function's safetensors weights")
        weights = os.path.join(directory, WEIGHTS_FILE)
        cfg = validate.config_from_dict(REControlConfig, config, os.path.join(directory, CONFIG_FILE), complete=True)
        module = build_on_meta(cls, cfg, os.path.join(directory, CONFIG_FILE))
        common = validate.check_tensors(state, module.state_dict(), weights, "RE-Control value function config")
        module.load_state_dict(state, assign=True)
        module.to(device=device, dtype=dtype or common)
        return module


@dataclass(frozen=True)
class REControl:
    """RE-Control steering: `generate(..., steering=REControl(value_fn, n_steps=5, step_size=0.5))`.
    Compares by value (the artifact by identity), so an equal object built anew for each call
    shares the CUDA graphs of the first (cuda_graphs.py)."""

    value_fn: REControlValue
    n_steps: int = 5
    step_size: float = 0.5

    def __post_init__(self):
        if not isinstance(self.value_fn, REControlValue):
            raise TypeError(f"REControl needs an REControlValue, got {type(self.value_fn).__name__}")
        validate.need_int("n_steps", self.n_steps, 0)
        validate.need_real("step_size", self.step_size, 0.0)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.value_fn.control(h, self.n_steps, self.step_size)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fast path reads in place (a CUDA graph holds their addresses)."""
        return tuple(self.value_fn.parameters())


# ---- eager reference ---------------------------------------------------------------------------
@torch.no_grad()
def generate_row_recontrol(model, prompt: torch.Tensor, *, steering: REControl, max_new_tokens: int,
                           sampling, row_seed: int, eos_ids: frozenset[int]) -> list[int]:
    """One unpadded prompt: the unmodified HF model re-run over the whole sequence each step, a
    forward hook on its final norm doing the n ascent steps with autograd."""
    from .reference import generate_row_hooked

    inner, _, _ = backbone_parts(model)
    vf = steering.value_fn

    def hook(_module, _inputs, out):
        with torch.enable_grad():
            x = out.detach().to(vf.dtype)
            for _ in range(steering.n_steps):
                x = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(vf(x).sum(), x)
                x = x + steering.step_size * g
        return x.detach().to(out.dtype)

    handles = [inner.norm.register_forward_hook(hook)]
    return generate_row_hooked(model, prompt, handles, max_new_tokens=max_new_tokens, sampling=sampling,
                               row_seed=row_seed, eos_ids=eos_ids)


# ---- fit ---------------------------------------------------------------------------------------
def read_reward_rows(data, tokenizer=None) -> list[tuple[list[int], list[int], float]]:
    """[(prompt ids, response ids, reward)] of a JSONL path or a list of dicts (module
    docstring); ValueError naming the row for a missing key, a non-finite reward or bad text."""
    rows = []
    for where, r in read_rows(data, ("prompt", "response", "reward")):
        reward = r["reward"]
        if type(reward) not in (int, float) or not math.isfinite(reward):
            raise ValueError(f"{where}: reward must be a finite number, got {reward!r}")
        prompt, response = encode_pair(r, where, tokenizer)
        rows.append((prompt, response, float(reward)))
    return rows


@torch.no_grad()
def _states(model, rows):
    """Per example: the final-norm states that decide each response token and the end state
    [T + 1, d] — s_0 after the prompt, ..., s_T after the whole response."""
    dev = next(model.parameters()).device
    out = []
    for prompt, response, reward in rows:
        ids = torch.tensor([prompt + response], device=dev)
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()
        out.append((h[len(prompt) - 1:], reward))
    return out


def fit_re_control(model, data, *, tokenizer=None, hidden_dims=(256, 256), activation="relu", epochs: int = 20,
                   lr: float = 1e-3, gamma: float = 1.0, batch_size: int = 256, seed: int = 0,
                   progress: bool = True, out_dir=None) -> REControlValue:
    """Train an RE-Control value function on a frozen backbone (module docstring: data, targets).
    Returns it (and saves it to out_dir when given)."""
    from tqdm.auto import tqdm

    if epochs < 1 or lr <= 0 or not (0 < gamma <= 1):
        raise ValueError(f"epochs >= 1, lr > 0 and 0 < gamma <= 1 needed, got {epochs}, {lr}, {gamma}")
    rows = read_reward_rows(data, tokenizer)
    info = backbone_info(model)
    torch.manual_seed(seed)
    vf = REControlValue(REControlConfig(info.hidden_size, list(hidden_dims), activation, info.model_type))
    dev = next(model.parameters()).device
    vf.to(dev)
    traj = _states(model, rows)
    states = torch.cat([h for h, _ in traj])
    ends = torch.cumsum(torch.tensor([h.shape[0] for h, _ in traj]), 0) - 1  # index of each s_T
    rewards = torch.tensor([r for _, r in traj], device=dev)
    is_end = torch.zeros(states.shape[0], dtype=torch.bool, device=dev)
    is_end[ends.to(dev)] = True
    opt = torch.optim.Adam(vf.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc="RE-Control value (Bellman)", disable=not progress)
    for _ in bar:
        with torch.no_grad():  # targets under the current V: next state's value, or the reward
            nxt = vf(torch.roll(states, -1, 0))
            target = gamma * nxt
            target[is_end] = rewards
        total = 0.0
        for idx in torch.randperm(states.shape[0], generator=g).split(batch_size):
            idx = idx.to(dev)
            loss = F.mse_loss(vf(states[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        bar.set_postfix(loss=total / states.shape[0])
    vf.last_loss = total / states.shape[0]
    vf.eval()
    if out_dir is not None:
        vf.save_pretrained(out_dir)
    return vf
