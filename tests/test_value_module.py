"""The SVGT value module: building blocks vs torch.nn, closed-form gradient vs autograd,
generator formulas, artifact round trip and its error messages."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svgt_fast import SVGTConfig, SVGTModule
from svgt_fast.layers import EncoderLayer, MultiHeadAttention
from svgt_fast.tiny import build_value_module
from svgt_fast.value_module import gradient_delta


def _cfg(**kw):
    base = dict(hidden_size=48, extract_layer=2, num_backbone_layers=5, value_dim=32, n_heads=4,
                n_intervention_tokens=3, vlp_n_heads=8)
    base.update(kw)
    return SVGTConfig(**base)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
    return module


def test_multihead_attention_equals_torch():
    torch.manual_seed(0)
    ours = _randomize(MultiHeadAttention(32, 4), 1)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 2, 32)
    torch.testing.assert_close(ours(q, kv), ref(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_single_key_shortcut_equals_full_attention():
    torch.manual_seed(1)
    mha = _randomize(MultiHeadAttention(32, 4), 8).double()
    q, kv = torch.randn(3, 5, 32, dtype=torch.float64), torch.randn(3, 1, 32, dtype=torch.float64)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).double().eval()
    ref.load_state_dict(mha.state_dict())
    torch.testing.assert_close(mha(q, kv), ref(q, kv, kv, need_weights=False)[0], rtol=1e-12, atol=1e-12)


def test_encoder_layer_equals_torch_post_norm():
    ours = _randomize(EncoderLayer(32, 4, 128), 2)
    ref = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, activation="gelu", batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 32)
    with torch.no_grad():  # eval + no_grad also exercises torch's fused fast path
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gradient_delta_matches_autograd_fp64():
    module = _randomize(SVGTModule(_cfg()), 3).double()
    disc = module.discriminator
    z = torch.randn(64, 32, dtype=torch.float64) * 2
    # The reference: autograd of relu(s).sum(), then -step * s * g / (|g| + 1e-8)^2 per row.
    zg = z.clone().requires_grad_(True)
    s = F.relu(disc(zg))
    (g,) = torch.autograd.grad(s.sum(), zg)
    n = g.norm(dim=-1, keepdim=True)
    expected = -(s.detach()[:, None] / (n + 1e-8)) * (g / (n + 1e-8)) * 0.7
    got = gradient_delta(disc, z, 0.7)
    assert (s > 0).any() and (s == 0).any(), "test needs rows on both sides of the relu"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # And the raw gradient of s itself, not only through the relu.
    zg = z.clone().requires_grad_(True)
    (g_raw,) = torch.autograd.grad(disc(zg).sum(), zg)
    torch.testing.assert_close(disc.score_and_grad(z)[1], g_raw, rtol=1e-10, atol=1e-12)


def test_gradient_delta_per_row_step_and_zero_rows():
    module = _randomize(SVGTModule(_cfg()), 4).double()
    z = torch.randn(8, 32, dtype=torch.float64)
    steps = torch.linspace(0, 2, 8, dtype=torch.float64)
    per_row = gradient_delta(module.discriminator, z, steps)
    for i in range(8):
        torch.testing.assert_close(per_row[i], gradient_delta(module.discriminator, z[i:i + 1], float(steps[i]))[0])
    assert torch.all(per_row[0] == 0)
    s, _ = module.discriminator.score_and_grad(z)
    assert torch.all(per_row[s <= 0] == 0)


@pytest.mark.parametrize("generator", ["vlp", "mlp"])
def test_bridge_formula(generator):
    module = _randomize(SVGTModule(_cfg(generator=generator)), 5).double()
    h = torch.randn(4, 48, dtype=torch.float64)
    got = module.bridge(h, 0.5)
    assert got.shape == (4, 3, 48)
    z = module.value(h)
    dz = gradient_delta(module.discriminator, z, 0.5)
    gen = module.generator
    if generator == "vlp":
        mha = nn.MultiheadAttention(48, 8, batch_first=True).double().eval()
        mha.load_state_dict(gen.cross_attn.state_dict())
        ctx = torch.stack([h, gen.value_proj[2](F.gelu(gen.value_proj[0](dz)))], dim=1)
        att = mha(gen.query_seeds.expand(4, -1, -1), ctx, ctx, need_weights=False)[0]
        want = F.layer_norm(h[:, None] + F.softplus(gen.gate_alpha) * att, (48,), gen.layer_norm.weight, gen.layer_norm.bias)
    else:
        a = F.softplus(gen.gating_alpha)
        mlp = gen.generator[3](F.gelu(gen.generator[0](dz))).view(4, 3, 48)
        want = h[:, None] + a * (gen.safe_bias + a * (mlp + gen.position_embeds))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_value_transformer_against_torch_encoder():
    module = _randomize(SVGTModule(_cfg()), 6)
    vt = module.value_transformer
    layers = []
    for ours in vt.self_attn_layers:
        ref = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, activation="gelu", batch_first=True).eval()
        ref.load_state_dict(ours.state_dict())
        layers.append(ref)
    h = torch.randn(3, 2, 48)
    x = F.gelu(vt.prompt_proj[0](h))
    for ref in layers:
        x = ref(x)
    want = F.layer_norm(F.gelu(vt.aggregate[0](x[:, -1])), (32,), vt.aggregate[3].weight, vt.aggregate[3].bias)
    torch.testing.assert_close(module.value(h), want, rtol=1e-5, atol=1e-5)


def test_value_guard_replaces_nan():
    module = SVGTModule(_cfg())
    h = torch.randn(2, 48)
    h[0, 0] = float("nan")
    z = module.value(h)
    assert torch.isfinite(z).all()


def test_value_guard_in_fp16():
    """The ±1e6 guard cannot be represented in fp16 (max 65504): there it clamps to fp16's range
    (it raised before, so SVGT could not run on an fp16 backbone at all)."""
    from svgt_fast.value_module import _guard

    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 7.0, -60000.0], dtype=torch.float16)
    assert _guard(x).tolist() == [0.0, 65504.0, -65504.0, 7.0, -60000.0]
    assert _guard(torch.tensor([3e7, float("inf")])).tolist() == [1e6, 1e6]  # fp32: the reference's ±1e6
    module = SVGTModule(_cfg()).half()
    assert torch.isfinite(module.value(torch.randn(2, 48).half() * 1e4)).all()


def test_svgt_on_an_fp16_backbone():
    """SVGT on an fp16 model, both engines: it runs, steers, and the fast engine's greedy tokens
    start as the reference's (fp16 rounding may part them later; fp32 is the exact bar)."""
    import svgt_fast
    from svgt_fast.tiny import build_tiny_model

    model = build_tiny_model("llama", seed=1, dtype=torch.float16)
    steering = svgt_fast.SVGT(build_value_module(model, seed=1), refresh_interval=2)
    prompts = [[5, 6, 7, 8], [9, 10]]
    fast = svgt_fast.generate(model, prompts, max_new_tokens=8, steering=steering, engine="fast")
    ref = svgt_fast.generate(model, prompts, max_new_tokens=8, steering=steering, engine="reference")
    plain = svgt_fast.generate(model, prompts, max_new_tokens=8, engine="fast")
    assert torch.equal(fast.new_tokens[:, :4], ref.new_tokens[:, :4])
    assert not torch.equal(fast.new_tokens, plain.new_tokens)


@pytest.mark.parametrize("kw", [dict(generator="mlp"), dict(aggregate="transformer", attention_pooling=True)])
def test_save_load_round_trip(tmp_path, kw):
    module = _randomize(SVGTModule(_cfg(**kw)), 7)
    module.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    loaded = SVGTModule.from_pretrained(tmp_path / "m")
    assert loaded.config == module.config
    h = torch.randn(2, 48)
    torch.testing.assert_close(loaded.bridge(h), module.bridge(h), rtol=0, atol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        SVGTModule.from_pretrained(tmp_path / "absent")
    pt = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(ValueError, match="is a file"):
        SVGTModule.from_pretrained(pt)
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"a": torch.zeros(1)}, d / "model.pt")
    with pytest.raises(FileNotFoundError, match="pickled checkpoints are not loaded"):
        SVGTModule.from_pretrained(d)

    module = SVGTModule(_cfg())
    module.save_pretrained(tmp_path / "ok")
    # Not safetensors behind the right name.
    bad = tmp_path / "bad"
    module.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        SVGTModule.from_pretrained(bad)
    # Missing keys.
    from safetensors.torch import load_file, save_file

    miss = tmp_path / "miss"
    module.save_pretrained(miss)
    state = load_file(miss / "model.safetensors")
    del state["discriminator.classifier.3.bias"]
    save_file(state, miss / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['discriminator.classifier.3.bias'\]"):
        SVGTModule.from_pretrained(miss)
    # Another module's config with these weights: shapes disagree.
    meta = json.loads((tmp_path / "ok" / "config.json").read_text())
    meta["config"]["value_dim"] = 64
    (tmp_path / "ok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape mismatch"):
        SVGTModule.from_pretrained(tmp_path / "ok")
    meta["format"] = "something.else"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        SVGTModule.from_pretrained(tmp_path / "ok")
    (miss / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        SVGTModule.from_pretrained(miss)


@pytest.mark.parametrize("kw,msg", [
    (dict(extract_layer=4), "extract_layer 4"),
    (dict(n_intervention_tokens=0), "n_intervention_tokens"),
    (dict(n_intervention_tokens=17), "n_intervention_tokens"),
    (dict(generator="transformer"), "generator"),
    (dict(value_dim=30), "n_heads"),
    (dict(vlp_n_heads=7), "vlp_n_heads"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(**kw)


def test_check_backbone_mismatch(tiny_models):
    llama, qwen = tiny_models["llama"], tiny_models["qwen2"]
    build_value_module(llama).check_backbone(llama)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        build_value_module(llama).check_backbone(qwen)
    with pytest.raises(ValueError, match="hidden size 48"):
        SVGTModule(_cfg(backbone_model_type="llama")).check_backbone(llama)
    with pytest.raises(ValueError, match="built for 7 layers"):
        SVGTModule(_cfg(hidden_size=64, num_backbone_layers=7, backbone_model_type="llama")).check_backbone(llama)


def test_check_fits_names_every_problem(tiny_models):
    """The one fit check the four artifact kinds share: every mismatch in one message, None skips."""
    from svgt_fast.backbone import check_fits

    llama = tiny_models["llama"]
    cfg = llama.config
    info = check_fits("x", llama, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, model_type="llama",
                      intermediate_size=cfg.intermediate_size)
    assert info.hidden_size == cfg.hidden_size
    check_fits("x", llama, hidden_size=cfg.hidden_size)  # unchecked fields are skipped
    with pytest.raises(ValueError) as exc:
        check_fits("NeVA artifact (neurons)", llama, hidden_size=cfg.hidden_size + 1, num_layers=cfg.num_hidden_layers + 2,
                   model_type="qwen2", intermediate_size=cfg.intermediate_size + 3)
    msg = str(exc.value)
    assert msg.startswith("NeVA artifact (neurons) does not fit this backbone: ")
    for part in (f"hidden size {cfg.hidden_size + 1}", f"MLP size {cfg.intermediate_size + 3}",
                 f"built for {cfg.num_hidden_layers + 2} layers", "built for model_type 'qwen2'"):
        assert part in msg, part


def test_for_backbone_default_extract_layer(tiny_models):
    from svgt_fast.backbone import default_extract_layer

    assert default_extract_layer(32) == 16 and default_extract_layer(21) == 10
    assert default_extract_layer(20) == 17 and default_extract_layer(5) == 2
    cfg = SVGTConfig.for_backbone(tiny_models["qwen3"].config)
    assert (cfg.extract_layer, cfg.num_backbone_layers, cfg.backbone_model_type) == (2, 5, "qwen3")
