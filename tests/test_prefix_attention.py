"""Triton bridge-token prefix attention vs its PyTorch reference (CPU: TRITON_INTERPRET=1)."""
import pytest
import torch

from svgt_fast.kernels.reference import prefix_attention_ref


def _case(seed, B, M, Hq, Hkv, D, S, kmax, device="cpu", dtype=torch.float32, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, M, Hq, D, generator=g)
    if noncontig:  # caches as slices of a bigger [L, maxB, Hkv, S+1, D] buffer, like the engine's
        big_k = torch.randn(2, B + 1, Hkv, S + 1, D, generator=g)
        big_v = torch.randn(2, B + 1, Hkv, S + 1, D, generator=g)
        kc, vc = big_k[1, :B], big_v[1, :B]
    else:
        kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    kb, vb = torch.randn(B, Hkv, kmax, D, generator=g), torch.randn(B, Hkv, kmax, D, generator=g)
    P = torch.randint(1, max(2, S // 2), (B,), generator=g)
    bl = torch.randint(0, kmax + 1, (B,), generator=g)
    to = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return [to(t) for t in (q, kc, vc, kb, vb)] + [P.to(device), bl.to(device)]


# Where the kernel runs: the GPU when there is one, else Triton's interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run_both(q, kc, vc, kb, vb, P, bl, q_start, n_slots, n_splits, bridge=True, q_pos=None):
    from svgt_fast.kernels.prefix_attention import prefix_attention

    if q_pos is None:
        q_pos = q_start[:, None] + torch.arange(q.shape[1])[None]
    q, kc, vc, kb, vb, P, bl, q_pos = (t.to(DEV) for t in (q, kc, vc, kb, vb, P, bl, q_pos))
    args = (q, kc, vc, q_pos, P, bl, kb if bridge else None, vb if bridge else None, 0.25)
    got = prefix_attention(*args, n_slots=n_slots, n_splits=n_splits)
    want = prefix_attention_ref(*args, n_slots=n_slots)
    return got, want


@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("bridge", [True, False])
def test_decode_ragged_gqa(n_splits, bridge):
    q, kc, vc, kb, vb, P, bl = _case(0, B=3, M=1, Hq=4, Hkv=2, D=16, S=70, kmax=5, noncontig=True)
    # decode: each sequence's query is its newest token; lengths differ per sequence
    n_tok = torch.tensor([70, 33, 9])
    P = torch.minimum(P, n_tok)
    q_start = n_tok - 1 + torch.where(torch.tensor(bridge), bl, torch.zeros_like(bl))
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, q_start, 70, n_splits, bridge)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_chunk_causal_with_bridge(n_splits):
    """A refresh chunk: rows = bridge then response, causal by logical index."""
    q, kc, vc, kb, vb, P, bl = _case(1, B=2, M=21, Hq=6, Hkv=3, D=32, S=50, kmax=16)
    bl = torch.tensor([16, 3])
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, P.clone(), 50, n_splits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gapped_rows_bridge_then_window():
    """A window refresh chunk: K bridge rows, then the last W response rows (a gap between)."""
    q, kc, vc, kb, vb, P, bl = _case(5, B=2, M=9, Hq=4, Hkv=1, D=16, S=60, kmax=5)
    bl = torch.tensor([5, 2])
    t = torch.tensor([30, 12])  # response tokens so far
    rows = []
    for b in range(2):
        bridge_rows = P[b] + torch.arange(5).clamp(max=int(bl[b]) - 1)
        window = P[b] + bl[b] + t[b] - 4 + torch.arange(4)
        rows.append(torch.cat([bridge_rows, window]))
    q_pos = torch.stack(rows)
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, None, 60, 2, q_pos=q_pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_from_zero_no_bridge_mha():
    q, kc, vc, kb, vb, P, bl = _case(2, B=2, M=40, Hq=2, Hkv=2, D=16, S=40, kmax=1)
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, torch.zeros(2, dtype=torch.long), 40, 1, bridge=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    from svgt_fast.kernels.prefix_attention import prefix_attention

    q, kc, vc, kb, vb, P, bl = _case(3, B=2, M=1, Hq=4, Hkv=2, D=16, S=20, kmax=4)
    with pytest.raises(ValueError, match="dtype"):
        prefix_attention(q, kc.double(), vc, P[:, None], P, bl, kb, vb, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        prefix_attention(q[..., :12], kc[..., :12], vc[..., :12], P[:, None], P, bl, None, None, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        prefix_attention(q[:, :, :3], kc, vc, P[:, None], P, bl, kb, vb, 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        prefix_attention(q, kc, vc, P[:, None].float(), P, bl, kb, vb, 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        prefix_attention(q, kc, vc, P, P, bl, kb, vb, 1.0)


# bf16 only on the GPU: Triton's interpreter multiplies bf16's raw bits in tl.dot (see
# svgt_fast.kernels.interpreter_problem), so on CPU fp16 is the low-precision case.
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")]),
    torch.float16])
@pytest.mark.parametrize("n_splits", [None, 3])
def test_low_precision_error_bound(dtype, n_splits):
    """Error vs an fp32 reference at most 2x that of the same-dtype PyTorch reference (GPU: the 8B
    layer's heads at 4096 context; CPU: small heads, 300 slots)."""
    B, Hq, Hkv, D, S = (4, 32, 8, 128, 4096) if DEV == "cuda" else (3, 4, 2, 16, 300)
    q, kc, vc, kb, vb, P, bl = _case(4, B=B, M=1, Hq=Hq, Hkv=Hkv, D=D, S=S, kmax=5, device=DEV, dtype=dtype)
    q_pos = (torch.full((B,), S - 1, device=DEV) + bl)[:, None]
    from svgt_fast.kernels.prefix_attention import prefix_attention

    exact = prefix_attention_ref(*(t.float() for t in (q, kc, vc)), q_pos, P, bl, kb.float(), vb.float(), 0.088)
    ref = prefix_attention_ref(q, kc, vc, q_pos, P, bl, kb, vb, 0.088, compute_dtype=dtype).float()
    got = prefix_attention(q, kc, vc, q_pos, P, bl, kb, vb, 0.088, n_splits=n_splits)
    assert got.dtype == dtype
    assert (got.float() - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-6


@pytest.mark.skipif(DEV == "cuda", reason="the refusal is for Triton's CPU interpreter")
def test_bf16_on_cpu_is_refused():
    from svgt_fast.kernels.prefix_attention import prefix_attention

    q, kc, vc, kb, vb, P, bl = _case(3, B=2, M=1, Hq=4, Hkv=2, D=16, S=20, kmax=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="11584"):
        prefix_attention(q, kc, vc, (P + bl)[:, None], P, bl, kb, vb, 1.0)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_seq_idx_reads_mapped_cache_rows(n_splits):
    """A compacted sub-batch: query row b attends over cache row seq_idx[b] of the full caches,
    exactly as if those rows had been gathered first (Triton and reference)."""
    from svgt_fast.kernels.prefix_attention import prefix_attention

    q, kc, vc, kb, vb, P, bl = _case(5, B=5, M=4, Hq=4, Hkv=2, D=16, S=40, kmax=6, noncontig=True)
    seq = torch.tensor([3, 0, 4])  # 3 query rows over 5 cache rows, out of order
    q3, P3, bl3 = q[:3], P[seq], bl[seq]
    q_pos = (P3 + bl3)[:, None] + torch.arange(4)[None]
    q3, kc, vc, kb, vb, P3, bl3, q_pos, seq = (t.to(DEV) for t in (q3, kc, vc, kb, vb, P3, bl3, q_pos, seq))
    mapped = prefix_attention(q3, kc, vc, q_pos, P3, bl3, kb, vb, 0.25, n_slots=40, n_splits=n_splits, seq_idx=seq)
    gathered = prefix_attention(q3, kc[seq], vc[seq], q_pos, P3, bl3, kb[seq], vb[seq], 0.25, n_slots=40,
                                n_splits=n_splits)
    ref = prefix_attention_ref(q3, kc, vc, q_pos, P3, bl3, kb, vb, 0.25, n_slots=40, seq_idx=seq)
    assert torch.equal(mapped, gathered)
    torch.testing.assert_close(mapped, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_idx"):
        prefix_attention(q3, kc, vc, q_pos, P3, bl3, kb, vb, 0.25, seq_idx=seq[:2])


def test_rows_that_see_no_key_give_zero():
    """Padding rows (logical index -1) see no key: 0 from the kernel and the reference, never NaN
    (a NaN there would reach the dump slots and, through 0 * NaN, real rows)."""
    q, kc, vc, kb, vb, P, bl = _case(6, B=2, M=3, Hq=4, Hkv=2, D=16, S=20, kmax=4)
    q_pos = torch.tensor([[-1, 5, -1], [7, -1, 9]])
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, None, 20, 1, q_pos=q_pos)
    pad = (q_pos < 0).to(got.device)
    assert not torch.isnan(want).any() and not torch.isnan(got).any()
    assert (got[pad] == 0).all() and (want[pad] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_slots_no_query_sees_are_never_read(n_splits):
    """Every slot and bridge entry that no query of a row sees is NaN (what an earlier call that
    overflowed leaves): the output is that of clean caches, in the kernel and the reference.
    The bridge_len token slots after the newest token are the ones that leaked before (they
    are below the newest token's logical index, so they were loaded and weighted 0 * NaN)."""
    q, kc, vc, kb, vb, P, bl = _case(7, B=3, M=4, Hq=4, Hkv=2, D=16, S=40, kmax=5)
    bl = torch.tensor([5, 2, 0])
    n_tok = torch.tensor([30, 12, 7])  # tokens written so far (prompt + response)
    P = torch.minimum(P, n_tok - 2)
    q_pos = (n_tok + bl - 4)[:, None] + torch.arange(4)[None]  # the last 4 rows: newest last
    clean = _run_both(q, kc, vc, kb, vb, P, bl, None, 40, n_splits, q_pos=q_pos)
    kc, vc, kb, vb = (t.clone() for t in (kc, vc, kb, vb))
    for b in range(3):
        kc[b, :, n_tok[b]:] = vc[b, :, n_tok[b]:] = float("nan")
        kb[b, :, bl[b]:] = vb[b, :, bl[b]:] = float("nan")
    got, want = _run_both(q, kc, vc, kb, vb, P, bl, None, 40, n_splits, q_pos=q_pos)
    assert not torch.isnan(got).any() and not torch.isnan(want).any()
    assert torch.equal(want, clean[1]) and torch.equal(got, clean[0])


@pytest.mark.parametrize("config", [(32, 4), (16, 2), (64, 8)])
def test_tile_configs_equal_reference(config):
    """The benchmark-only tile override (BLOCK_N, num_warps) computes the same attention."""
    from svgt_fast.kernels.prefix_attention import prefix_attention

    q, kc, vc, kb, vb, P, bl = _case(6, B=2, M=3, Hq=4, Hkv=2, D=16, S=70, kmax=5)
    q_pos = (P + bl)[:, None] + torch.arange(3)[None] + 40
    args = [t.to(DEV) for t in (q, kc, vc, q_pos, P, bl, kb, vb)]
    got = prefix_attention(*args, 0.25, n_splits=2, config=config)
    torch.testing.assert_close(got, prefix_attention_ref(*args, 0.25), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="config"):
        prefix_attention(*args, 0.25, config=(24, 4))
