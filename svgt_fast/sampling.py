"""Token sampling shared by every engine: greedy, temperature, top-k, top-p, seeded.

Random draws come from a counter-based hash of (row seed, step, token id) rather than from a
torch.Generator. That makes a seeded sample depend only on the request, never on the batch it
rides in, the engine that runs it or the device, and it needs no host sync (the step can live in
a device tensor inside a CUDA graph). The draw is the exponential race: argmax(p / E) with
E ~ Exp(1) samples from p.

`SamplingParams` hold Python numbers (the eager paths). Inside a CUDA graph a number would be
baked into the captured kernels, so the graphs read `DeviceSampling` instead: temperature and
top_p in 0-d device tensors that each call refills, with only what changes the captured code
(greedy or not, top_k, whether top_p filters) left in the graph key (`SamplingParams.graph_key`).
Both give bit-identical tokens.

A row whose next-token distribution is undefined — a NaN or +inf logit, or every logit -inf, as
when a steering strength overflows — gets the id `NONFINITE` (-1) instead of a token: the
engines stop that row there (finish reason "nonfinite") rather than emit id 0 for the rest of
the call. The check reads the one chosen score per row, so it adds no pass over the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import validate

# The smallest temperature sampled: 1 / 1e-6 keeps logits up to ~1e32 finite in float32 (at 1e-300
# the division gave inf, softmax NaN and every token id 0). Temperature 0 is greedy.
MIN_TEMPERATURE = 1e-6
NONFINITE = -1  # what sample_next returns for a row whose logits are not finite
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        t = validate.need_real("temperature", self.temperature, 0.0)
        if 0.0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature {t!r} is below {MIN_TEMPERATURE:g}: logits / temperature overflow float32 "
                             "(every token came out id 0); use temperature=0 for greedy")
        validate.need_real("top_p", self.top_p, 0.0, 1.0, open_lo=True)
        validate.need_int("top_k", self.top_k, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def nucleus(self) -> bool:
        """Whether top_p filters anything (the top-p branch runs)."""
        return self.top_p < 1.0

    @property
    def graph_key(self) -> tuple:
        """What a captured sampling step depends on beyond `DeviceSampling`'s tensors: the code
        path (greedy: nothing else is read) and top_k (a shape)."""
        return ("greedy",) if self.greedy else ("sample", self.top_k, self.nucleus)


class DeviceSampling:
    """`SamplingParams` for a CUDA graph: temperature (and its reciprocal) and top_p live in 0-d
    float32 tensors on `device`, which `set` refills (no host sync; the graph's next replay reads
    the new values); top_k, greedy and nucleus are fixed (they are the graph key)."""

    def __init__(self, params: SamplingParams, device):
        self.key = params.graph_key
        self.top_k, self.greedy, self.nucleus = params.top_k, params.greedy, params.nucleus
        self.temperature, self.inv_temperature, self.top_p = (
            torch.ones((), dtype=torch.float32, device=device) for _ in range(3))
        self.params = None
        self.set(params)

    def set(self, params: SamplingParams) -> "DeviceSampling":
        """Take params' temperature and top_p (params.graph_key must be this one's key)."""
        if params.graph_key != self.key:
            raise ValueError(f"sampling {params} does not fit a graph captured for {self.key}")
        if params != self.params and not params.greedy:
            self.temperature.fill_(params.temperature)
            self.inv_temperature.fill_(cuda_reciprocal(params.temperature))
            self.top_p.fill_(params.top_p)
        self.params = params
        return self


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(row_seeds: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """Uniform draws in (0, 1), float32, shape [B, vocab], a pure function of (seed, step, id).

    row_seeds: [B] int64; step: int or 0-d/[B] int64 tensor (the index of the token drawn).
    """
    seeds = row_seeds.to(torch.int64)
    step_t = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    base = _hash32((seeds & _MASK32) ^ _hash32((seeds >> 32) & _MASK32))
    base = _hash32(base ^ ((step_t * _GOLDEN + 0x632BE5AB) & _MASK32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32((base.unsqueeze(-1) + ids * _GOLDEN) & _MASK32)
    bits = _hash32(bits ^ base.unsqueeze(-1))
    # 24 random bits give float32-exact values in (0, 1): never 0, never 1.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def cuda_reciprocal(value: float) -> float:
    """The factor ATen's CUDA kernel multiplies by when a float32 tensor is divided by the Python
    number `value` (div_true_kernel_cuda: `opmath_t(1.0) / scalar_value<opmath_t>`): the float32
    reciprocal of value rounded to float32 — not the double reciprocal rounded, which differs in
    the last bit for about a quarter of temperatures (0.55, 0.85, 1.1, ...)."""
    one = torch.ones((), dtype=torch.float32)
    return (one / torch.tensor(value, dtype=torch.float32)).item()


def _over_temperature(x: torch.Tensor, params) -> torch.Tensor:
    """x / temperature, computed as the Python-number division computes it: ATen divides by a
    Python number on the CPU (a 0-d float32 tensor divides the same), but on CUDA multiplies by
    its float32 reciprocal (`cuda_reciprocal`), which `DeviceSampling.inv_temperature` holds."""
    if isinstance(params, DeviceSampling) and x.is_cuda:
        return x * params.inv_temperature
    return x / params.temperature


def filter_logits(logits: torch.Tensor, params: SamplingParams | DeviceSampling) -> torch.Tensor:
    """Temperature, then top-k (ties at the k-th value kept), then top-p (smallest prefix whose
    mass reaches top_p; the most likely token always kept). Returns float32 logits with -inf."""
    x = _over_temperature(logits.float(), params)
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.nucleus:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= params.top_p  # compared in float32 (number or 0-d tensor alike)
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_next(
    logits: torch.Tensor, params: SamplingParams | DeviceSampling, row_seeds: torch.Tensor, step: torch.Tensor | int
) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V]; NONFINITE for a row whose distribution is
    undefined. max treats NaN as the largest value, so the chosen score is NaN or +inf whenever
    any logit is (softmax turns NaN or +inf into NaN everywhere), and -inf when every logit is
    -inf: checking that one score per row finds every such row."""
    if params.greedy:
        score = logits
    else:
        probs = torch.softmax(filter_logits(logits, params), dim=-1)
        score = probs / -torch.log(uniform_noise(row_seeds, step, logits.shape[-1]))
    best, pick = score.max(dim=-1)  # one kernel gives the score and the index (first of ties, as argmax)
    # x - x is 0 for a finite x and NaN for NaN or +-inf: two kernels per step (isfinite is four)
    return torch.where(best - best == 0, pick, NONFINITE)
