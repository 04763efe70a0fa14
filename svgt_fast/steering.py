"""Steering options passed to `svgt_fast.generate(..., steering=...)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import validate
from .value_module import SVGTModule

TRIGGERS = ("current", "prompt")
POLICIES = ("always", "sparse")
REFRESH_MODES = ("exact", "bridge", "project", "window=W")


def parse_refresh(refresh: str) -> tuple[str, int | None]:
    """"exact" | "bridge" | "project" | "window=W" (W >= 0) -> (mode, W); "bridge" is window=0."""
    if refresh in ("exact", "project"):
        return refresh, None
    if refresh == "bridge":
        return "window", 0
    if isinstance(refresh, str) and refresh.startswith("window="):
        w = refresh[len("window="):]
        if w.isascii() and w.isdigit():  # not "²", which isdigit() takes and int() refuses
            return "window", int(w)
    raise ValueError(f"refresh must be one of {REFRESH_MODES} (W an int >= 0), got {refresh!r}")


def ema(old: torch.Tensor, new: torch.Tensor, beta: float) -> torch.Tensor:
    """Bridge refresh: b <- beta * b + (1 - beta) * b_new."""
    return beta * old + (1.0 - beta) * new


def trigger_drift(h: torch.Tensor, h_ref: torch.Tensor) -> torch.Tensor:
    """1 - cos(h, h_ref) per row in fp32 (0 where either is zero): how far the trigger state
    moved since the row's last refresh (sparse triggering).

    Computed as (|h - r|^2 - (|h| - |r|)^2) / (2 |h| |r|), which equals 1 - cos, instead of
    1 - h.r / (|h| |r|): the latter loses every digit below ~1e-7 to cancellation (a row whose
    trigger state did not move at all got a drift of +-6e-8 that depended on the summation
    order, so `drift_threshold=0` fired or not by chance, and the kernel and the eager path
    disagreed). Here identical states give exactly 0 and small drifts keep their digits.
    The trigger kernel computes the same sums (kernels/trigger.py)."""
    hf, rf = h.float(), h_ref.float()
    nh, nr = (hf * hf).sum(-1).sqrt(), (rf * rf).sum(-1).sqrt()
    dd = ((hf - rf) ** 2).sum(-1)
    denom = 2 * nh * nr
    drift = (dd - (nh - nr) ** 2) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, drift.clamp_min(0.0), torch.zeros_like(denom))


@dataclass(frozen=True)
class SVGT:
    """SVGT steering with a value module.

    refresh_interval: a new bridge is blended in every this many generated tokens (the first is
        made at prefill from the last prompt token).
    beta: EMA weight of the old bridge at a refresh.
    trigger: "current" — the refresh reads the extract-layer state of the newest token (dynamic
        anchors); "prompt" — it always reads the last prompt token (the authors' recompute path).
    gradient_step_size: strength of the discriminator's gradient delta δz.
    refresh: how a refresh reaches the KV cache (engine="fast"): "exact" (the reference
        semantics: bridge and every response token re-run through the upper stack), "window=W"
        (bridge + the last W response tokens), "bridge" (bridge only), "project" (the authors'
        shortcut: k/v projections of the raw bridge vector). The reference engine runs "exact".
    policy: "always" (the paper: every sequence is refreshed every refresh_interval tokens) or
        "sparse": the value module fires for a sequence only when, at a due step, its
        discriminator score s > score_threshold or its trigger state drifted since the last
        refresh, 1 - cos(h_t, h_ref) > drift_threshold (None = no drift rule). A sequence whose
        first check (at the prompt) does not fire runs with its bridge gated off — exactly
        unsteered — until it fires; its first bridge is then taken as is (no EMA), the
        response keeps its positions after the bridge (refresh "exact" re-computes it; the
        other modes keep its stale K/V, as they do for every refresh).
    """

    module: SVGTModule
    refresh_interval: int = 5
    beta: float = 0.8
    trigger: str = "current"
    gradient_step_size: float = 1.0
    refresh: str = "exact"
    policy: str = "always"
    score_threshold: float = 0.0
    drift_threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.module, SVGTModule):
            raise TypeError(f"SVGT needs an SVGTModule, got {type(self.module).__name__}")
        validate.need_int("refresh_interval", self.refresh_interval, 1)
        validate.need_real("beta", self.beta, 0.0, 1.0)
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        validate.need_real("gradient_step_size", self.gradient_step_size, 0.0)
        parse_refresh(self.refresh)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        # +-inf thresholds are meaningful: never / always fire on the score
        validate.need_real("score_threshold", self.score_threshold, finite=False)
        if self.drift_threshold is not None:
            validate.need_real("drift_threshold (1 - cosine, or None for no drift rule)", self.drift_threshold, 0.0, 2.0)

    def fires(self, score: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        """Which rows fire at a due step: [B] bool from the discriminator score and the drift."""
        if self.policy == "always":
            return torch.ones_like(score, dtype=torch.bool)
        out = score > self.score_threshold
        if self.drift_threshold is not None:
            out = out | (drift > self.drift_threshold)
        return out

    @property
    def refresh_spec(self) -> tuple[str, int | None]:
        return parse_refresh(self.refresh)

    @property
    def n_tokens(self) -> int:
        return self.module.config.n_intervention_tokens

    def bridge(self, trigger: torch.Tensor) -> torch.Tensor:
        return self.module.bridge(trigger, self.gradient_step_size)

    def bridge_and_score(self, trigger: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.bridge_and_score(trigger, self.gradient_step_size)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fast path reads in place (a CUDA graph holds their addresses)."""
        return (*self.module.parameters(), *self.module.buffers())

    def refresh_bridge(self, bridge: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
        """EMA of the old bridge [B, K, d] and a new one from trigger [B, d]."""
        return ema(bridge, self.bridge(trigger), self.beta)
