"""Seeded sampling: reproducible, batch-independent, and drawing from the filtered distribution."""
import pytest
import torch

from svgt_fast.sampling import NONFINITE, SamplingParams, filter_logits, sample_next, uniform_noise


def test_noise_is_uniform_open_interval_and_deterministic():
    seeds = torch.tensor([0, 1, 2**40 + 3], dtype=torch.int64)
    u = uniform_noise(seeds, 7, 50_000)
    assert u.dtype == torch.float32 and u.shape == (3, 50_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.equal(u, uniform_noise(seeds, 7, 50_000))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], uniform_noise(seeds, 8, 50_000)[0])
    # Moments of U(0,1): mean 1/2, variance 1/12 (50k draws per row: 4-sigma bounds).
    assert torch.allclose(u.mean(dim=1), torch.full((3,), 0.5), atol=4 * (1 / 12 / 50_000) ** 0.5)
    assert torch.allclose(u.var(dim=1), torch.full((3,), 1 / 12), atol=0.003)


def test_row_draw_independent_of_batch():
    logits = torch.randn(5, 40)
    seeds = torch.arange(100, 105)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=20)
    batch = sample_next(logits, p, seeds, 3)
    for i in range(5):
        assert sample_next(logits[i:i + 1], p, seeds[i:i + 1], 3)[0] == batch[i]


def test_greedy_and_degenerate_filters_are_argmax():
    logits = torch.randn(4, 33)
    seeds = torch.arange(4)
    want = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingParams(), seeds, 0), want)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_k=1), seeds, 0), want)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-6), seeds, 0), want)


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False]]
    top_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.isfinite(top_p).tolist() == [[True, True, True, False]]
    top_k = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    assert torch.isfinite(top_k).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 50, 1.0), (0.8, 40, 0.95), (1.0, 5, 0.3), (2.0, 0, 0.99)])
def test_filters_keep_the_tokens_hf_warpers_keep(temperature, top_k, top_p):
    """The same support as HF generate's warpers (temperature, then top-k, then top-p) on rows
    shaped like LM logits (a few dominant tokens over a long tail). Only a token whose
    preceding mass lies within float32 rounding of top_p may fall either way (HF sums the
    ascending sort, we the descending one); such tokens are counted and must stay rare."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(int(temperature * 100) + top_k + int(top_p * 1000))
    logits = torch.randn(400, 1000, generator=g) * 2.0
    logits[:, :8] += torch.rand(400, 8, generator=g) * 12  # a few likely tokens, as after real text
    ours = torch.isfinite(filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)))
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    hf = torch.isfinite(x)
    assert 0 < int(ours.sum()) < ours.numel()  # the filters did cut (not a vacuous comparison)

    # the preceding mass of each token in exact-ish arithmetic, for the rounding band only
    x64 = (logits.double() / temperature)
    if top_k:
        x64 = x64.masked_fill(x64 < torch.topk(x64, top_k, dim=-1).values[..., -1:], float("-inf"))
    sx, order = torch.sort(x64, dim=-1, descending=True)
    pr = torch.softmax(sx, dim=-1)
    before = torch.zeros_like(pr).scatter(-1, order, torch.cumsum(pr, -1) - pr)
    borderline = (before - top_p).abs() < 1e-5
    differ = ours != hf
    assert not (differ & ~borderline).any(), f"{int((differ & ~borderline).sum())} tokens kept differently"
    assert int(differ.sum()) <= 2, int(differ.sum())


def test_frequencies_follow_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20_000
    logits = torch.log(probs).expand(n, -1)
    draws = sample_next(logits, SamplingParams(temperature=1.0), torch.arange(n), 0)
    freq = torch.bincount(draws, minlength=4).float() / n
    # 4-sigma binomial bounds for each category.
    assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt())


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
    (dict(temperature=1e-7), ValueError, "below 1e-06"),
    (dict(temperature=True), TypeError, "temperature must be a number, got bool"),
    (dict(top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-2), ValueError, "top_k must be >= 0"),
    (dict(top_k=3.0), TypeError, "top_k must be an int"),
])
def test_bad_params(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SamplingParams(**kw)


def test_smallest_temperature_is_greedy_and_finite():
    """At MIN_TEMPERATURE the scaled logits stay finite (below it 1/T overflowed float32 and every
    draw was id 0), so the draw is the argmax: the greedy tokens, in both engines."""
    from svgt_fast import generate
    from svgt_fast.sampling import MIN_TEMPERATURE
    from svgt_fast.tiny import build_tiny_model

    model = build_tiny_model("llama", seed=0)
    rows = [[1, 2, 3], [7, 8]]
    greedy = generate(model, rows, max_new_tokens=12, eos_token_id=[]).new_tokens
    for engine in ("fast", "reference"):
        cold = generate(model, rows, max_new_tokens=12, temperature=MIN_TEMPERATURE, seed=5, engine=engine,
                        eos_token_id=[]).new_tokens
        assert torch.equal(cold, greedy), engine
    logits = torch.tensor([[1e4, -1e4, 0.0]])
    assert int(sample_next(logits, SamplingParams(temperature=MIN_TEMPERATURE), torch.arange(1), 0)) == 0


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.3, top_k=3), SamplingParams(temperature=0.9, top_p=0.5)],
                         ids=["greedy", "temperature", "top_k", "top_p"])
def test_undefined_distributions_give_nonfinite(params):
    """A row with a NaN or +inf logit, or only -inf logits, has no next-token distribution: it
    gets NONFINITE, never a token (before, argmax over NaN gave id 0). A -inf logit among finite
    ones only removes that token. Rows beside them keep their tokens."""
    inf, nan = float("inf"), float("nan")
    torch.manual_seed(0)
    good = torch.randn(2, 9)
    bad = torch.randn(4, 9)
    bad[0, 4] = nan
    bad[1, 0] = inf
    bad[2] = -inf
    bad[3, :] = nan
    masked = good.clone()
    masked[:, 2] = -inf  # still a distribution
    logits = torch.cat([good, bad, masked])
    seeds = torch.arange(logits.shape[0])
    tok = sample_next(logits, params, seeds, 5)
    assert tok[2:6].tolist() == [NONFINITE] * 4
    assert torch.equal(tok[:2], sample_next(good, params, seeds[:2], 5)) and bool((tok[:2] >= 0).all())
    assert bool((tok[6:] >= 0).all()) and not bool((tok[6:] == 2).any())
    # only the rows themselves count: each bad row alone gives NONFINITE too
    for i in range(2, 6):
        assert int(sample_next(logits[i:i + 1], params, seeds[i:i + 1], 5)[0]) == NONFINITE


def test_temperature_overflow_is_nonfinite_not_a_token():
    """Finite logits that the temperature pushes past float32 (1e35 / 1e-6) make softmax NaN: the
    row stops rather than sample id 0."""
    logits = torch.tensor([[1e35, 0.0, -1e35], [1.0, 2.0, 0.5]])
    tok = sample_next(logits, SamplingParams(temperature=1e-6), torch.tensor([1, 2]), 0)
    assert tok.tolist() == [NONFINITE, 1]


@pytest.mark.parametrize("temperature", [0.55, 0.8, 0.85, 1.1, 1.7])
def test_graph_temperature_factor_is_atens_cuda_reciprocal(temperature):
    """On CUDA, `logits / T` (a Python number) multiplies by opmath_t(1) / opmath_t(T), both float32
    (ATen's div_true_kernel_cuda); a graph multiplies by DeviceSampling.inv_temperature, so that
    must be the same float32 number — not the double 1/T rounded, one ulp away at 0.55, 0.85, 1.1
    and 1.7. (The division itself on a GPU: test_gpu.test_graph_temperature_matches_cuda_division.)"""
    import struct

    from svgt_fast.sampling import DeviceSampling, cuda_reciprocal

    def f32(x):
        return struct.unpack("f", struct.pack("f", x))[0]

    want = f32(1.0 / f32(temperature))  # float32 division: the exact quotient of two float32s, rounded once
    assert cuda_reciprocal(temperature) == want
    dev = DeviceSampling(SamplingParams(temperature=temperature, top_p=0.9), "cpu")
    assert dev.inv_temperature.item() == want
    if temperature != 0.8:  # the cases where rounding the double reciprocal gives another float32
        assert want != f32(1.0 / temperature)
