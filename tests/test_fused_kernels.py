"""Fused Triton kernels of the decode path (RMSNorm, add + RMSNorm, SwiGLU, RoPE + cache write,
split merge) against their PyTorch references (CPU: TRITON_INTERPRET=1; GPU when present)."""
import pytest
import torch

from svgt_fast.kernels.reference import rms_norm_ref, rope_cache_write_ref, silu_mul_ref



def _g(seed):
    return torch.Generator().manual_seed(seed)


# (device, dtype) pairs. The Triton interpreter (CPU) converts fp32 -> bf16 by truncation, not
# round-to-nearest, so bf16 runs only on the GPU; fp16 (numpy-native, round-to-nearest) stands
# in for the 16-bit path on CPU, where results are bit-exact too.
CASES = ([("cuda", t) for t in (torch.float32, torch.float16, torch.bfloat16)] if torch.cuda.is_available()
         else [("cpu", torch.float32), ("cpu", torch.float16)])


def _tol(dtype):
    # 16-bit: torch's own tolerance for the dtype (the fp32 sum order differs by a rounding step)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("d", [64, 96])
def test_rms_norm_and_add(device, dtype, d):
    from svgt_fast.kernels.rms_norm import add_rms_norm, rms_norm

    g = _g(d)
    x = (torch.randn(3, 5, d, generator=g) * 3).to(device, dtype)
    delta = torch.randn(3, 5, d, generator=g).to(device, dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(device, dtype)
    tol = _tol(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **tol)
    s, h = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(s, x + delta)  # the residual sum rounds exactly like torch's add
    torch.testing.assert_close(h, rms_norm_ref(x + delta, w, 1e-6), **tol)
    # a non-contiguous row view (Qwen3's per-head q/k norm reads a split of the fused qkv)
    big = torch.randn(4, 3 * d, generator=g).to(device, dtype)
    view = big[:, d:2 * d]
    torch.testing.assert_close(rms_norm(view, w, 1e-6), rms_norm_ref(view, w, 1e-6), **tol)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:-1], 1e-6)


@pytest.mark.parametrize("device,dtype", CASES)
def test_silu_mul(device, dtype):
    from svgt_fast.kernels.silu_mul import silu_mul

    gu = (torch.randn(2, 3, 2 * 80, generator=_g(1)) * 4).to(device, dtype)
    got = silu_mul(gu)
    assert got.shape == (2, 3, 80)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else _tol(dtype)
    torch.testing.assert_close(got, silu_mul_ref(gu), **tol)
    with pytest.raises(ValueError, match="even"):
        silu_mul(gu[..., :-1])


def _rope_case(seed, device, dtype, B=3, M=6, Hq=4, Hkv=2, D=16, S=20, kmax=5, n_pos=40):
    g = _g(seed)
    qkv = torch.randn(B, M, (Hq + 2 * Hkv) * D, generator=g).to(device, dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, M, Hq, D), k.view(B, M, Hkv, D), v.view(B, M, Hkv, D)
    ang = torch.randn(n_pos, D // 2, generator=g)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(device, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(device, dtype)
    P = torch.tensor([2, 4, 7])[:B].to(device)
    bl = torch.tensor([3, 0, 5])[:B].to(device)
    # rows: a refresh-like chunk (bridge rows then response rows), a padding row (-1) and one
    # past the token cache (slot >= S must be skipped), positions past the table (clamped)
    logical = torch.tensor([[2, 3, 4, 5, 6, -1], [4, 5, 6, 7, 24, 45], [7, 8, 11, 12, 13, 30]])[:B, :M].to(device)
    return q, k, v, cos, sin, logical, P, bl, S, kmax


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("bridge", [True, False])
def test_rope_cache_write(device, dtype, bridge):
    from svgt_fast.kernels.rope_cache_write import rope_cache_write

    q, k, v, cos, sin, logical, P, bl, S, kmax = _rope_case(2, device, dtype)
    B, Hkv, D = q.shape[0], k.shape[2], q.shape[3]
    poison = lambda *s: torch.full(s, 7.0, device=device, dtype=dtype)
    caches = [[poison(B, Hkv, S, D) for _ in range(4)] for _ in range(2)]  # (kc, vc, kb, vb) x (ours, ref)
    for c in caches:  # bridge buffers Kmax wide
        c[2], c[3] = poison(B, Hkv, kmax, D), poison(B, Hkv, kmax, D)
    outs = []
    for fn, (kc, vc, kb, vb) in ((rope_cache_write, caches[0]), (rope_cache_write_ref, caches[1])):
        outs.append(fn(q, k, v, cos, sin, logical, P, bl, kc, vc, kb if bridge else None, vb if bridge else None,
                       n_tok_slots=S))
    assert torch.equal(outs[0], outs[1])  # same roundings as HF's apply_rotary_pos_emb
    for got, want in zip(caches[0], caches[1]):
        assert torch.equal(got, want)
    # something was written and something was left alone
    assert (caches[0][0] != 7).any() and (caches[0][0] == 7).any()
    if bridge:
        assert (caches[0][2] != 7).any()
    else:
        assert (caches[0][2] == 7).all()


@pytest.mark.parametrize("device,dtype", CASES)
def test_rope_cache_write_with_qk_norm(device, dtype):
    """Qwen3's per-head RMSNorm fused in front of the rotation equals rms_norm_ref then RoPE. The
    kernel sums the two halves' squares separately, so fp32 may differ from torch's mean in the
    last bit; the activation-dtype results are compared to within one rounding of that dtype."""
    from svgt_fast.kernels.rope_cache_write import rope_cache_write

    q, k, v, cos, sin, logical, P, bl, S, kmax = _rope_case(4, device, dtype)
    B, Hkv, D = q.shape[0], k.shape[2], q.shape[3]
    g = torch.Generator().manual_seed(4)
    qn, kn = ((1 + 0.3 * torch.randn(D, generator=g)).to(device, dtype) for _ in range(2))
    caches = [[torch.zeros(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2)] for _ in range(2)]
    outs = [fn(q * 3, k * 3, v, cos, sin, logical, P, bl, *c, n_tok_slots=S, qk_norm=(qn, kn, 1e-6))
            for fn, c in ((rope_cache_write, caches[0]), (rope_cache_write_ref, caches[1]))]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(outs[0], outs[1], rtol=2 * eps, atol=2 * eps)
    for got, want in zip(caches[0], caches[1]):
        torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps)
    plain = rope_cache_write_ref(q * 3, k * 3, v, cos, sin, logical, P, bl, *[torch.zeros_like(c) for c in caches[1]],
                                 n_tok_slots=S)
    assert not torch.allclose(plain, outs[1])  # the norm did something
    with pytest.raises(ValueError, match="norm weight"):
        rope_cache_write(q, k, v, cos, sin, logical, P, bl, *caches[0], qk_norm=(qn[:-1], kn, 1e-6))


@pytest.mark.parametrize("device,dtype", CASES[:1])
def test_rope_cache_write_seq_idx(device, dtype):
    """A compacted sub-batch writes cache rows seq_idx[b] of the full caches in place: the same
    bytes as writing gathered rows and scattering them back; other rows stay untouched."""
    from svgt_fast.kernels.rope_cache_write import rope_cache_write

    q, k, v, cos, sin, logical, P, bl, S, kmax = _rope_case(3, device, dtype)
    Hkv, D = k.shape[2], q.shape[3]
    rows = 5
    seq = torch.tensor([4, 0, 2], device=device)
    poison = lambda *s: torch.full(s, 7.0, device=device, dtype=dtype)
    full = [[poison(rows, Hkv, S, D), poison(rows, Hkv, S, D), poison(rows, Hkv, kmax, D), poison(rows, Hkv, kmax, D)]
            for _ in range(3)]
    q_mapped = rope_cache_write(q, k, v, cos, sin, logical, P, bl, *full[0], n_tok_slots=S, seq_idx=seq)
    rope_cache_write_ref(q, k, v, cos, sin, logical, P, bl, *full[1], n_tok_slots=S, seq_idx=seq)
    part = [c[seq].clone() for c in full[2]]
    q_plain = rope_cache_write(q, k, v, cos, sin, logical, P, bl, *part, n_tok_slots=S)
    for c, p_ in zip(full[2], part):
        c[seq] = p_
    assert torch.equal(q_mapped, q_plain)
    for got, ref, want in zip(full[0], full[1], full[2]):
        assert torch.equal(got, want) and torch.equal(ref, want)
    assert (full[0][0][[1, 3]] == 7).all() and (full[0][0][seq] != 7).any()


def test_rope_cache_write_rejects_bad_input():
    from svgt_fast.kernels.rope_cache_write import rope_cache_write

    dev = CASES[0][0]
    q, k, v, cos, sin, logical, P, bl, S, kmax = _rope_case(3, dev, torch.float32)
    kc = torch.zeros(3, 2, S, 16, device=dev)
    with pytest.raises(ValueError, match="dtype"):
        rope_cache_write(q, k, v, cos.double(), sin.double(), logical, P, bl, kc, kc.clone())
    with pytest.raises(ValueError, match="do not fit"):
        rope_cache_write(q, k, v, cos, sin, logical[:, :2], P, bl, kc, kc.clone())


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_refuse_strided_per_row_vectors():
    """Per-row vectors are read as flat arrays: an expanded (stride-0) or strided view is refused
    with a clear error instead of being read past its elements."""
    from svgt_fast.kernels.conva_edit import conva_edit
    from svgt_fast.kernels.silu_mul import silu_mul

    I, N = 8, 3
    gu = torch.randn(N, 2 * I, device=DEV)
    a, c = torch.ones(I, device=DEV), torch.zeros(I, device=DEV)
    flag = torch.ones(1, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="on must be contiguous"):
        silu_mul(gu, (a, c, flag.expand(N)))
    with pytest.raises(ValueError, match="edit a must be contiguous"):
        silu_mul(gu, (torch.ones(2 * I, device=DEV)[::2], c, flag.expand(N).contiguous()))
    d = 16
    x, w = torch.randn(N, d, device=DEV), torch.randn(d, device=DEV)
    with pytest.raises(ValueError, match="on must be contiguous"):
        conva_edit(x, None, w, 0.0, w, w, 0.0, 0.9, 0.1, flag.expand(N), 1.0)
    with pytest.raises(ValueError, match="w must be a float32 tensor"):
        conva_edit(x, None, w.double(), 0.0, w, w, 0.0, 0.9, 0.1, flag.expand(N).contiguous(), 1.0)
