"""ConVA (issue 6): the fused edit kernel against its reference, the fit (probes, layer
selection, gate), the engine against the hooked HF reference, mixing, artifact, bad input."""
import json

import pytest
import torch

from svgt_fast import SVGT, ConVA, ConVAVectors, Engine, fit_conva, generate
from svgt_fast.kernels.reference import conva_edit_ref
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import ragged_prompts

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MARK = (11, 12, 13)  # tokens that make a text "express the value"
NEG = (21, 22, 23)


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    """8 layers: ConVA never steers the last 5, so layers 0..2 are candidates. A small init
    keeps the last token readable in the residual stream (so the value is linearly probeable)."""
    return build_tiny_model("llama", seed=90, directory=str(tmp_path_factory.mktemp("m8")), num_hidden_layers=8,
                            initializer_range=0.03)


def _data(path, V, n=120, seed=0):
    """Context-controlled pairs: the same random context ending in a value / anti-value token,
    plus unrelated texts (value null) ending in other tokens."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            ctx = torch.randint(30, V, (6,), generator=g).tolist()
            k = int(torch.randint(0, 3, (1,), generator=g))
            f.write(json.dumps({"text": ctx + [MARK[k]], "value": 1}) + "\n")
            f.write(json.dumps({"text": ctx + [NEG[k]], "value": 0}) + "\n")
            if i % 2 == 0:
                f.write(json.dumps({"text": torch.randint(30, V, (7,), generator=g).tolist(), "value": None}) + "\n")


@pytest.fixture(scope="module")
def vectors(model8, tmp_path_factory):
    d = tmp_path_factory.mktemp("conva")
    _data(d / "data.jsonl", model8.config.vocab_size)
    return fit_conva(model8, str(d / "data.jsonl"), progress=False, out_dir=d / "vec"), d


def test_fit_selects_layers_and_round_trips(model8, vectors):
    vec, d = vectors
    cfg = vec.config
    assert cfg.layers and all(0 <= l <= 2 for l in cfg.layers)  # never the last 5 of 8
    assert all(a > 0.9 for a in cfg.accuracies)
    assert all(a > 0.8 for a in cfg.gate_accuracies)
    loaded = ConVAVectors.from_pretrained(d / "vec")
    assert loaded.config.layers == cfg.layers and torch.equal(loaded.w, vec.w) and torch.equal(loaded.u, vec.u)


@pytest.mark.parametrize("with_delta", [False, True])
def test_edit_kernel_equals_reference(with_delta):
    from svgt_fast.kernels.conva_edit import conva_edit

    g = torch.Generator().manual_seed(3)
    d = 48
    x = torch.randn(4, 5, d, generator=g).to(DEV)
    delta = torch.randn(4, 5, d, generator=g).to(DEV) if with_delta else None
    w, u = torch.randn(d, generator=g).to(DEV), torch.randn(d, generator=g).to(DEV) * 0.3
    v = w / w.norm()
    on = (torch.arange(20) % 3 != 0).to(DEV)
    wv = float(w @ v)
    got = conva_edit(x, delta, w, 0.2, v, u, -0.1, 0.9, 0.5, on, wv)
    want = conva_edit_ref(x, delta, w, 0.2, v, u, -0.1, 0.9, 0.5, on, wv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the probe reads P0 on edited rows; rows off or with a closed gate are untouched
    e = (x if delta is None else x + delta).reshape(-1, d)
    p_after = torch.sigmoid(got.reshape(-1, d) @ w + 0.2)
    gate = torch.sigmoid(e @ u - 0.1) >= 0.5
    edited = on & gate & (torch.sigmoid(e @ w + 0.2) < 0.9)
    assert edited.any() and (~edited).any()
    torch.testing.assert_close(p_after[edited], torch.full_like(p_after[edited], 0.9), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.reshape(-1, d)[~edited], e[~edited], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_engine_equals_hooked_reference(model8, vectors, attention):
    vec, _ = vectors
    steering = ConVA(vec, p0=0.99, g0=0.05)
    rows = ragged_prompts(91, lengths=(5, 8, 3))
    eng = Engine(model8, max_batch=3, max_seq_len=32, attention=attention)
    fast = generate(model8, rows, steering=steering, max_new_tokens=8, engine=eng)
    ref = generate(model8, rows, steering=steering, max_new_tokens=8, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    # one prompt alone: its prefill rows' edit mask was once a stride-0 view that the Triton
    # kernel read past (steered by whatever followed it in memory; found by tests/scenarios.py)
    one = generate(model8, rows[1:2], steering=steering, max_new_tokens=8, engine=eng)
    assert one.new_tokens[0].tolist() == ref.new_tokens[1].tolist()
    if attention == "torch":  # the edit acts (backend-independent; the interpreter run is slow)
        plain = generate(model8, rows, max_new_tokens=8, engine=eng)
        assert (plain.new_tokens != fast.new_tokens).any()


def test_mixed_with_svgt_and_unsteered(model8, vectors):
    vec, _ = vectors
    cv = ConVA(vec, p0=0.99, g0=0.05)
    sv = SVGT(build_value_module(model8, seed=92), refresh_interval=2)
    steerings = [cv, None, sv]
    rows = ragged_prompts(92, lengths=(6, 4, 7))
    eng = Engine(model8, max_batch=4, max_seq_len=32)
    eng.graph_emulation = True  # through the graph runners too
    mixed = generate(model8, rows, steering=steerings, max_new_tokens=8, engine=eng)
    for i, (row, st) in enumerate(zip(rows, steerings)):
        alone = generate(model8, [row], steering=st, max_new_tokens=8, engine="reference")
        assert mixed.new_tokens[i].tolist() == alone.new_tokens[0].tolist(), i


def test_bad_input(model8, vectors, tmp_path):
    vec, _ = vectors
    with pytest.raises(ValueError, match="p0"):
        ConVA(vec, p0=1.0)
    other = build_tiny_model("llama", seed=93)  # 5 layers
    with pytest.raises(ValueError, match="layers"):
        generate(other, [[1, 2, 3]], steering=ConVA(vec), max_new_tokens=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": [1, 2], "value": 3}\n')
    with pytest.raises(ValueError, match="value"):
        fit_conva(model8, str(bad), progress=False)
    one_sided = tmp_path / "one.jsonl"
    one_sided.write_text('{"text": [1, 2], "value": 1}\n{"text": [3, 4], "value": 1}\n')
    with pytest.raises(ValueError, match="both"):
        fit_conva(model8, str(one_sided), progress=False)
