"""NeVA (neuron-level value editing; seed paper 003, DESIGN §3).

Value-relevant neurons are picked from contrastive activation statistics of the MLP activations
(act = silu(gate) * up, the down projection's input) on examples that express a value (1) or its
opposite (0): per layer, the `top_k` neurons of largest standardised mean difference
    t_j = (mu1_j - mu0_j) / sqrt((var1_j + var0_j) / 2 + 1e-6)
At inference each edited neuron j of a row's MLP activation becomes
    act_j <- act_j * a_j + c_j,    a_j = 1, c_j = strength * (mu1_j - mu0_j)
(every other neuron: a = 1, c = 0), fused into the SwiGLU kernel (kernels/silu_mul.py).
Data: the ConVA JSONL schema ({"text", "value": 1 | 0}; null rows are ignored); features are
the activations at the text's last token (where a context-controlled pair differs). Artifact: config.json (format "svgt_fast.neva") +
model.safetensors (idx [L', k] int64, delta [L', k] float32 for config.layers).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from . import validate
from .backbone import backbone_info, backbone_parts, check_fits
from .value_module import CONFIG_FILE, WEIGHTS_FILE, load_artifact, save_artifact

FORMAT_NAME = "svgt_fast.neva"


@dataclass
class NeVAConfig:
    hidden_size: int
    intermediate_size: int
    num_backbone_layers: int
    layers: list[int]
    top_k: int
    scores: list[float] = field(default_factory=list)  # per layer: mean |t| of the chosen neurons
    backbone_model_type: str | None = None

    def __post_init__(self):
        validate.check_config_fields(self, "NeVAConfig")
        for i, s in enumerate(self.scores):
            validate.need_real(f"NeVAConfig: scores[{i}] (mean |t|)", s, 0.0)
        if not self.layers or self.top_k < 1 or self.top_k > self.intermediate_size:
            raise ValueError(f"NeVAConfig: layers {self.layers} / top_k {self.top_k} invalid")
        bad = [l for l in self.layers if not 0 <= l < self.num_backbone_layers]
        if bad:
            raise ValueError(f"NeVAConfig: layers {bad} outside the backbone's {self.num_backbone_layers}")


class NeVANeurons:
    def __init__(self, config: NeVAConfig, idx: torch.Tensor, delta: torch.Tensor, source: str = "NeVA neurons"):
        validate.check_tensors({"idx": idx, "delta": delta}, self.expected(config), source, "NeVA config")
        if int(idx.min()) < 0 or int(idx.max()) >= config.intermediate_size:
            raise ValueError(f"{source}: neuron ids outside 0..{config.intermediate_size - 1}")
        repeated = [config.layers[j] for j in range(len(config.layers)) if idx[j].unique().numel() < config.top_k]
        if repeated:  # the dense edit would keep one of the repeated neurons' deltas, and which one is unspecified
            raise ValueError(f"{source}: a neuron id repeats within layer(s) {repeated}")
        self.config, self.idx, self.delta = config, idx.long(), delta.float()

    @staticmethod
    def expected(config: NeVAConfig) -> dict:
        """name -> a meta tensor of the shape and dtype kind the config needs."""
        shape = (len(config.layers), config.top_k)
        return {"idx": torch.empty(shape, dtype=torch.long, device="meta"), "delta": torch.empty(shape, device="meta")}

    def dense(self, strength: float, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per steered layer, dense (a, c) [I] float32 vectors of the edit at this strength."""
        out = []
        for j in range(len(self.config.layers)):
            a = torch.ones(self.config.intermediate_size)
            c = torch.zeros(self.config.intermediate_size)
            c[self.idx[j]] = strength * self.delta[j]
            out.append((a.to(device), c.to(device)))
        return out

    def check_backbone(self, model) -> None:
        c = self.config
        check_fits("NeVA artifact (neurons)", model, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_layers=c.num_backbone_layers, model_type=c.backbone_model_type)

    def save_pretrained(self, directory) -> None:
        save_artifact(directory, FORMAT_NAME, asdict(self.config),
                      {"idx": self.idx.contiguous().cpu(), "delta": self.delta.contiguous().cpu()})

    @classmethod
    def from_pretrained(cls, directory) -> "NeVANeurons":
        config, state = load_artifact(directory, FORMAT_NAME, "the neurons' safetensors file")
        weights = os.path.join(directory, WEIGHTS_FILE)
        cfg = validate.config_from_dict(NeVAConfig, config, os.path.join(directory, CONFIG_FILE), complete=True)
        validate.check_tensors(state, cls.expected(cfg), weights, "NeVA config")  # names before unpacking
        return cls(cfg, **state, source=weights)


@dataclass(frozen=True)
class NeVA:
    """NeVA steering: `generate(..., steering=NeVA(neurons, strength=1.0))`.
    Compares by value (the artifact by identity), so an equal object built anew for each call
    shares the CUDA graphs of the first (cuda_graphs.py)."""

    neurons: NeVANeurons
    strength: float = 1.0

    def __post_init__(self):
        if not isinstance(self.neurons, NeVANeurons):
            raise TypeError(f"NeVA needs NeVANeurons, got {type(self.neurons).__name__}")
        validate.need_real("strength", self.strength)  # any finite value: a negative one steers away

    @property
    def layers(self) -> list[int]:
        return self.neurons.config.layers

    def edits(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = self.__dict__.setdefault("_dense", {})
        key = torch.device(device)
        if key not in cache:
            cache[key] = self.neurons.dense(self.strength, device)
        return cache[key]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fast path reads of the artifact in place: nothing (the dense edits it reads
        are made from idx and delta, once per NeVA object; a graph holds the object that made
        them)."""
        return ()


@torch.no_grad()
def generate_row_neva(model, prompt: torch.Tensor, *, steering: NeVA, max_new_tokens: int, sampling,
                      row_seed: int, eos_ids: frozenset[int]) -> list[int]:
    """One unpadded prompt: the unmodified HF model re-run each step, a pre-hook on each steered
    layer's down projection editing its input (the MLP activation) at the chosen neurons."""
    from .reference import generate_row_hooked

    _, layers, _ = backbone_parts(model)
    handles = []
    N = steering.neurons
    for j, l in enumerate(steering.layers):
        idx, c = N.idx[j].to(prompt.device), (steering.strength * N.delta[j]).to(prompt.device)

        def pre(_m, args, idx=idx, c=c):
            act = args[0].clone()
            act[..., idx] = (act[..., idx].float() * 1.0 + c).to(act.dtype)
            return (act, *args[1:])

        handles.append(layers[l].mlp.down_proj.register_forward_pre_hook(pre))
    return generate_row_hooked(model, prompt, handles, max_new_tokens=max_new_tokens, sampling=sampling,
                               row_seed=row_seed, eos_ids=eos_ids)


def fit_neva(model, data, *, tokenizer=None, top_k: int = 16, layers: list[int] | None = None,
             progress: bool = True, out_dir=None) -> NeVANeurons:
    """Contrastive activation statistics per layer (module docstring); keeps every layer given
    (default: all), the top_k neurons of each. Returns the neurons (saved to out_dir if given)."""
    from tqdm.auto import tqdm

    from .conva import _read

    rows = _read(data, tokenizer) if isinstance(data, (str, os.PathLike)) else list(data)
    rows = [(t, v) for t, v in rows if v is not None]
    if len({v for _, v in rows}) < 2:
        raise ValueError("NeVA needs examples of both value 1 and value 0")
    info = backbone_info(model)
    _, blocks, _ = backbone_parts(model)
    inter = int(model.config.intermediate_size)
    layers = list(range(info.num_layers)) if layers is None else [int(l) for l in layers]
    if top_k < 1 or top_k > inter:
        raise ValueError(f"top_k must lie in 1..{inter}, got {top_k}")
    dev = next(model.parameters()).device
    sums = {v: torch.zeros(len(layers), inter, dtype=torch.float64) for v in (0, 1)}
    sq = {v: torch.zeros(len(layers), inter, dtype=torch.float64) for v in (0, 1)}
    count = {0: 0, 1: 0}
    captured = {}
    handles = [blocks[l].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, j=j: captured.__setitem__(j, args[0][0, -1:].double().cpu())) for j, l in enumerate(layers)]
    try:
        with torch.no_grad():
            for text, v in tqdm(rows, desc="NeVA activations", disable=not progress):
                model(input_ids=torch.tensor([text], device=dev))
                for j in range(len(layers)):
                    a = captured[j]
                    sums[v][j] += a.sum(0)
                    sq[v][j] += (a * a).sum(0)
                count[v] += 1
    finally:
        for h in handles:
            h.remove()
    mu = {v: sums[v] / count[v] for v in (0, 1)}
    var = {v: (sq[v] / count[v] - mu[v] ** 2).clamp_min(0) for v in (0, 1)}
    diff = mu[1] - mu[0]
    t = diff / torch.sqrt((var[0] + var[1]) / 2 + 1e-6)
    idx = t.abs().topk(top_k, dim=-1).indices
    delta = diff.gather(1, idx).float()
    scores = t.abs().gather(1, idx).mean(-1).tolist()
    cfg = NeVAConfig(info.hidden_size, inter, info.num_layers, layers, top_k, scores, info.model_type)
    out = NeVANeurons(cfg, idx, delta)
    if out_dir is not None:
        out.save_pretrained(out_dir)
    return out
