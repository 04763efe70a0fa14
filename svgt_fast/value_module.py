"""The SVGT value module (DESIGN §1): ValueTransformer, Discriminator, gradient delta and the two
bridge generators, plus its safetensors + JSON artifact.

Shapes: d = backbone hidden size, d_v = value_dim, K = n_intervention_tokens, B = batch.
Parameter names follow the authors' checkpoint layout (a fact of their file format), so their
stage-2/stage-3 state dicts map onto ours by prefix alone (see convert.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import validate
from .layers import EncoderLayer, MultiHeadAttention

FORMAT_NAME = "svgt_fast.svgt_module"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

GENERATORS = ("vlp", "mlp")
AGGREGATES = ("mlp", "transformer")
_GUARD = 1e6  # the reference clamps value states to ±1e6 and zeroes NaNs


@dataclass
class SVGTConfig:
    """Hyper-parameters of one value module and the backbone it was built for."""

    hidden_size: int
    extract_layer: int
    num_backbone_layers: int
    backbone_model_type: str | None = None
    value_dim: int = 128
    n_heads: int = 4
    n_self_attn_layers: int = 2
    n_intervention_tokens: int = 5
    generator: str = "vlp"
    vlp_n_heads: int = 8
    aggregate: str = "mlp"
    attention_pooling: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"SVGTConfig: {msg}")

        validate.check_config_fields(self, "SVGTConfig")
        need(self.hidden_size > 0, f"hidden_size must be > 0, got {self.hidden_size}")
        need(self.num_backbone_layers >= 2, f"num_backbone_layers must be >= 2, got {self.num_backbone_layers}")
        need(0 <= self.extract_layer < self.num_backbone_layers - 1,
             f"extract_layer {self.extract_layer} must lie in 0..{self.num_backbone_layers - 2}")
        need(self.value_dim > 0 and self.value_dim % 2 == 0, f"value_dim must be even and > 0, got {self.value_dim}")
        need(self.n_heads >= 1 and self.vlp_n_heads >= 1,
             f"n_heads and vlp_n_heads must be >= 1, got {self.n_heads}, {self.vlp_n_heads}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        need(self.value_dim % self.n_heads == 0, f"value_dim {self.value_dim} not divisible by n_heads {self.n_heads}")
        need(self.n_self_attn_layers >= 0, "n_self_attn_layers must be >= 0")
        need(1 <= self.n_intervention_tokens <= 16,
             f"n_intervention_tokens (K) must lie in 1..16, got {self.n_intervention_tokens}")
        need(self.generator in GENERATORS, f"generator must be one of {GENERATORS}, got {self.generator!r}")
        need(self.aggregate in AGGREGATES, f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        need(self.hidden_size % self.vlp_n_heads == 0 or self.generator != "vlp",
             f"hidden_size {self.hidden_size} not divisible by vlp_n_heads {self.vlp_n_heads}")

    @classmethod
    def for_backbone(cls, model_config, **overrides) -> "SVGTConfig":
        """A config that fits a HF model config (extract layer defaulted as in DESIGN §1)."""
        from .backbone import default_extract_layer

        n = int(model_config.num_hidden_layers)
        args = dict(
            hidden_size=int(model_config.hidden_size),
            num_backbone_layers=n,
            extract_layer=default_extract_layer(n),
            backbone_model_type=getattr(model_config, "model_type", None),
        )
        args.update(overrides)
        return cls(**args)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", complete: bool = False) -> "SVGTConfig":
        """complete: every field must be given (an artifact's config.json); else the optional
        ones take their defaults (a config written by hand for the converter)."""
        return validate.config_from_dict(cls, data, source, complete=complete)


def _guard(x: torch.Tensor) -> torch.Tensor:
    # ±1e6, or the dtype's largest finite value where that is smaller (fp16: 65504, where ±1e6
    # cannot be represented and clamp() refuses it)
    g = min(_GUARD, torch.finfo(x.dtype).max)
    return torch.nan_to_num(x.clamp(-g, g), nan=0.0, posinf=g, neginf=-g)


class ValueTransformer(nn.Module):
    """Inference ("stage 3") path: trigger hiddens [B, T, d] -> value state z [B, d_v]."""

    def __init__(self, cfg: SVGTConfig):
        super().__init__()
        d, dv = cfg.hidden_size, cfg.value_dim
        if cfg.attention_pooling:
            self.pooling_query = nn.Parameter(torch.randn(1, dv) * 0.02)
        self.self_attn_layers = nn.ModuleList(
            EncoderLayer(dv, cfg.n_heads, 4 * dv, cfg.layer_norm_eps) for _ in range(cfg.n_self_attn_layers)
        )
        self.prompt_proj = nn.Sequential(nn.Linear(d, dv), nn.GELU())
        if cfg.aggregate == "mlp":
            # Slot 2 is the reference's dropout; Identity keeps the state-dict indices aligned.
            self.aggregate = nn.Sequential(nn.Linear(dv, dv), nn.GELU(), nn.Identity(), nn.LayerNorm(dv, eps=cfg.layer_norm_eps))
        else:
            self.aggregate = _EncoderStack(dv, cfg.n_heads, 2, cfg.layer_norm_eps)
        self.attention_pooling = cfg.attention_pooling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _guard(self.prompt_proj(h))
        for layer in self.self_attn_layers:
            x = _guard(layer(x))
        if self.attention_pooling:
            w = torch.softmax(x @ self.pooling_query.t() / math.sqrt(x.shape[-1]), dim=1)
            x = (w * x).sum(dim=1)
        else:
            x = x[:, -1]
        if isinstance(self.aggregate, _EncoderStack):
            x = self.aggregate(x[:, None])[:, 0]
        else:
            x = self.aggregate(x)
        return _guard(x)


class _EncoderStack(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, n_heads, 4 * dim, eps) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Discriminator(nn.Module):
    """s(z) = w2 · GELU(W1 z + b1) + b2, a score per row; s > 0 means unsafe."""

    def __init__(self, cfg: SVGTConfig):
        super().__init__()
        dv = cfg.value_dim
        self.classifier = nn.Sequential(nn.Linear(dv, dv // 2), nn.GELU(), nn.Identity(), nn.Linear(dv // 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z).squeeze(-1)

    def score_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form, no autograd: s [B] and ds/dz [B, d_v].

        ds/dz = W1^T (w2 ⊙ GELU'(W1 z + b1)), with GELU'(u) = Φ(u) + u φ(u) (exact erf GELU).
        """
        lin1, lin2 = self.classifier[0], self.classifier[3]
        u = F.linear(z, lin1.weight, lin1.bias)
        s = F.linear(F.gelu(u), lin2.weight, lin2.bias).squeeze(-1)
        cdf = 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
        grad = (lin2.weight[0] * (cdf + u * pdf)) @ lin1.weight
        return s, grad


def gradient_delta(discriminator: Discriminator, z: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
    """δz = −step · relu(s) · ∇s / (‖∇s‖ + 1e-8)²  — the reference's guards, row by row.

    Rows with s <= 0 get δz = 0 (relu kills both the scale and, in the reference, the gradient).
    step_size: a float or a [B] tensor (per-request strength).
    """
    s, g = discriminator.score_and_grad(z)
    return _delta_from(s, g, z, step_size)


def _delta_from(s: torch.Tensor, g: torch.Tensor, z: torch.Tensor, step_size) -> torch.Tensor:
    n = g.norm(dim=-1, keepdim=True) + 1e-8
    # a float stays a Python scalar: a tensor made from it inside a captured step would be a
    # host-to-device copy, which a CUDA graph capture refuses
    step = step_size.to(z.dtype) if isinstance(step_size, torch.Tensor) else float(step_size)
    if isinstance(step, torch.Tensor) and step.dim() == 1:
        step = step[:, None]
    return -step * (F.relu(s)[:, None] / n) * (g / n)


class VLPGenerator(nn.Module):
    """K learned query seeds attend to [h_t, value_proj(δz)];
    bridge = LayerNorm(h_t + softplus(gate_alpha) · attn)."""

    def __init__(self, cfg: SVGTConfig):
        super().__init__()
        d, K = cfg.hidden_size, cfg.n_intervention_tokens
        self.query_seeds = nn.Parameter(torch.randn(K, d) * 0.02)
        self.gate_alpha = nn.Parameter(torch.full((1,), -2.0))
        self.value_proj = nn.Sequential(nn.Linear(cfg.value_dim, d), nn.GELU(), nn.Linear(d, d))
        self.cross_attn = MultiHeadAttention(d, cfg.vlp_n_heads)
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, delta_z: torch.Tensor) -> torch.Tensor:
        ctx = torch.stack([h, self.value_proj(delta_z)], dim=1)  # [B, 2, d]
        q = self.query_seeds.expand(h.shape[0], -1, -1)
        att = self.cross_attn(q, ctx)
        return self.layer_norm(h[:, None] + F.softplus(self.gate_alpha) * att)


class TokenGenerator(nn.Module):
    """MLP variant: tokens = safe_bias + a·(MLP(δz) + pos); bridge = h_t + a·tokens, a = softplus(α)."""

    def __init__(self, cfg: SVGTConfig):
        super().__init__()
        d, K = cfg.hidden_size, cfg.n_intervention_tokens
        self.K = K
        self.gating_alpha = nn.Parameter(torch.full((1,), -2.0))
        self.position_embeds = nn.Parameter(torch.randn(K, d) * 0.02)
        self.safe_bias = nn.Parameter(torch.randn(K, d) * 0.02)
        self.generator = nn.Sequential(nn.Linear(cfg.value_dim, 2 * d), nn.GELU(), nn.Identity(), nn.Linear(2 * d, K * d))

    def forward(self, h: torch.Tensor, delta_z: torch.Tensor) -> torch.Tensor:
        a = F.softplus(self.gating_alpha)
        raw = self.generator(delta_z).view(h.shape[0], self.K, -1) + self.position_embeds
        tokens = self.safe_bias + a * raw
        return h[:, None] + a * tokens


class SVGTModule(nn.Module):
    """Value module beside a frozen backbone: trigger hidden h_t [B, d] -> K bridge tokens [B, K, d]."""

    def __init__(self, config: SVGTConfig):
        super().__init__()
        self.config = config
        self.value_transformer = ValueTransformer(config)
        self.discriminator = Discriminator(config)
        self.generator = VLPGenerator(config) if config.generator == "vlp" else TokenGenerator(config)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def value(self, trigger: torch.Tensor) -> torch.Tensor:
        """Value state z [B, d_v] from a trigger [B, d] (one token) or a trigger sequence [B, T, d]."""
        h = trigger[:, None] if trigger.dim() == 2 else trigger
        return self.value_transformer(h.to(self.dtype))

    def bridge(self, trigger: torch.Tensor, step_size: float | torch.Tensor = 1.0) -> torch.Tensor:
        """K bridge tokens [B, K, d] (module dtype) for trigger hidden states [B, d] or [B, T, d]."""
        return self.bridge_and_score(trigger, step_size)[0]

    def bridge_and_score(self, trigger: torch.Tensor, step_size: float | torch.Tensor = 1.0):
        """(bridge [B, K, d], discriminator score s [B]) — s > 0 reads as unsafe."""
        self._check_trigger(trigger)
        return self.bridge_from_value(trigger, self.value(trigger), step_size)

    def bridge_from_value(self, trigger: torch.Tensor, z: torch.Tensor, step_size: float | torch.Tensor = 1.0):
        """bridge_and_score for a value state z = value(trigger) already computed (the sparse
        trigger reads z first, then the bridge is made)."""
        s, g = self.discriminator.score_and_grad(z)
        dz = _delta_from(s, g, z, step_size)
        h_last = (trigger if trigger.dim() == 2 else trigger[:, -1]).to(self.dtype)
        return self.generator(h_last, dz), s

    def _check_trigger(self, trigger: torch.Tensor) -> None:
        if trigger.dim() not in (2, 3) or trigger.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"trigger must be [B, {self.config.hidden_size}] or [B, T, {self.config.hidden_size}], "
                f"got {tuple(trigger.shape)}"
            )

    # -- fitting a backbone --------------------------------------------------------------------
    def check_backbone(self, model) -> None:
        """Raise ValueError when this module was built for another backbone."""
        from .backbone import check_fits

        c = self.config
        info = check_fits("value module", model, hidden_size=c.hidden_size, num_layers=c.num_backbone_layers,
                          model_type=c.backbone_model_type)
        info.check_extract_layer(c.extract_layer)

    # -- artifact ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_artifact(directory, FORMAT_NAME, self.config.to_dict(), state)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None, dtype=None) -> "SVGTModule":
        config, state = load_artifact(directory, FORMAT_NAME, "the module's safetensors weights")
        cfg = SVGTConfig.from_dict(config, os.path.join(directory, CONFIG_FILE), complete=True)
        module = build_on_meta(cls, cfg, os.path.join(directory, CONFIG_FILE))
        module.load_state(state, source=os.path.join(directory, WEIGHTS_FILE))
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
        return module

    def load_state(self, state: dict, source: str = "state dict") -> None:
        """Strict load (validate.check_tensors: every missing, unexpected, misshapen, non-float
        or non-finite tensor named). The module takes the weights' dtype, their promotion when
        they mix."""
        dtype = validate.check_tensors(state, self.state_dict(), source, "SVGT module config")
        if any(p.is_meta for p in self.parameters()):  # built on the meta device by from_pretrained
            self.to_empty(device=next(iter(state.values())).device)
        self.to(dtype=dtype)
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v.copy_(state[k])


def build_on_meta(cls, config, source: str):
    """cls(config) on the meta device: sized, not allocated, so that a config which does not fit
    its weights (a corrupt hidden_size of 10^9) costs nothing and says so."""
    try:
        with torch.device("meta"):
            return cls(config)
    except (RuntimeError, SystemError, OverflowError, MemoryError) as exc:
        raise ValueError(f"{source}: sizes that cannot be built ({type(exc).__name__}: {exc})") from None


def load_artifact_config(directory: str | os.PathLike, format_name: str) -> dict:
    """Read and check the JSON config of an artifact directory; returns its "config" dict."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"no such artifact directory: {directory}")
    if not os.path.isdir(directory):
        raise ValueError(
            f"{directory} is a file; an artifact is a directory holding {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(safetensors). Import the authors' .pt checkpoints with svgt_fast.convert_reference_checkpoint"
        )
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        others = [f for f in os.listdir(directory) if f.endswith((".pt", ".pth", ".bin", ".ckpt"))]
        hint = f" (found {others}: pickled checkpoints are not loaded; convert them)" if others else ""
        raise FileNotFoundError(f"{directory}: missing {CONFIG_FILE}{hint}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: expected a JSON object with a \"config\" object (format {format_name!r})")
    if meta.get("format") != format_name:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {format_name!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} not supported (expected {FORMAT_VERSION})")
    return meta["config"]


def save_artifact(directory, format_name: str, config: dict, tensors: dict) -> None:
    """Write an artifact directory: CONFIG_FILE (format, version, config) + WEIGHTS_FILE."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    meta = {"format": format_name, "format_version": FORMAT_VERSION, "config": config}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": format_name})


def load_artifact(directory, format_name: str, what: str) -> tuple[dict, dict]:
    """(config, tensors) of an artifact directory, with errors that name the problem; `what`
    describes the weights file in the missing-file message."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = load_artifact_config(directory, format_name)
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{directory}: missing {WEIGHTS_FILE} ({what})")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from None
    # safetensors >= 0.8 hands out pointers into one buffer at the file's offsets, aligned to 4
    # bytes at best. CPU GEMMs take another path for unaligned operands, so a loaded artifact
    # computed 1 ulp away from the module that was saved (found with 0.8). Each tensor gets its
    # own (64-byte aligned) storage: one copy of a small file, once per load.
    return config, {name: t.clone() for name, t in state.items()}
