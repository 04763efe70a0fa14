"""Steering options passed to `svgt_fast.generate(..., steering=...)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .value_module import SVGTModule

TRIGGERS = ("current", "prompt")
REFRESH_MODES = ("exact", "bridge", "project", "window=W")


def parse_refresh(refresh: str) -> tuple[str, int | None]:
    """"exact" | "bridge" | "project" | "window=W" (W >= 0) -> (mode, W); "bridge" is window=0."""
    if refresh in ("exact", "project"):
        return refresh, None
    if refresh == "bridge":
        return "window", 0
    if isinstance(refresh, str) and refresh.startswith("window="):
        w = refresh[len("window="):]
        if w.isdigit():
            return "window", int(w)
    raise ValueError(f"refresh must be one of {REFRESH_MODES} (W an int >= 0), got {refresh!r}")


def ema(old: torch.Tensor, new: torch.Tensor, beta: float) -> torch.Tensor:
    """Bridge refresh: b <- beta * b + (1 - beta) * b_new."""
    return beta * old + (1.0 - beta) * new


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
    """

    module: SVGTModule
    refresh_interval: int = 5
    beta: float = 0.8
    trigger: str = "current"
    gradient_step_size: float = 1.0
    refresh: str = "exact"

    def __post_init__(self):
        if not isinstance(self.module, SVGTModule):
            raise TypeError(f"SVGT needs an SVGTModule, got {type(self.module).__name__}")
        if not (isinstance(self.refresh_interval, int) and self.refresh_interval >= 1):
            raise ValueError(f"refresh_interval must be an int >= 1, got {self.refresh_interval!r}")
        if not (0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        if not (self.gradient_step_size >= 0.0):
            raise ValueError(f"gradient_step_size must be >= 0, got {self.gradient_step_size}")
        parse_refresh(self.refresh)

    @property
    def refresh_spec(self) -> tuple[str, int | None]:
        return parse_refresh(self.refresh)

    @property
    def n_tokens(self) -> int:
        return self.module.config.n_intervention_tokens

    def bridge(self, trigger: torch.Tensor) -> torch.Tensor:
        return self.module.bridge(trigger, self.gradient_step_size)

    def refresh_bridge(self, bridge: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
        """EMA of the old bridge [B, K, d] and a new one from trigger [B, d]."""
        return ema(bridge, self.bridge(trigger), self.beta)
