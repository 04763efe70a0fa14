"""Import of the authors' stage-2/stage-3 checkpoints, fabricated here in their layout (same
parameter names and shapes, built from torch.nn modules) and checked against an eager port of
their inference math on the same random weights."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svgt_fast import SVGTConfig, SVGTModule, convert_reference_checkpoint

D, DV, K, H = 48, 32, 3, 4


class _AuthorsValueTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.cross_scale = nn.Parameter(torch.tensor([3.0]))
        self.response_proj = nn.Sequential(nn.Linear(D, DV), nn.GELU(), nn.Dropout(0.1))
        self.self_attn_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(DV, H, 4 * DV, 0.1, activation="gelu", batch_first=True) for _ in range(2))
        self.prompt_proj = nn.Sequential(nn.Linear(D, DV), nn.GELU(), nn.Dropout(0.1))
        self.cross_attn = nn.MultiheadAttention(DV, H, dropout=0.1, batch_first=True)
        self.cross_norm = nn.LayerNorm(DV)
        self.aggregate = nn.Sequential(nn.Linear(DV, DV), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(DV))

    def stage3(self, h):  # h [B, 1, D]
        x = self.prompt_proj(h)
        for layer in self.self_attn_layers:
            x = layer(x, src_key_padding_mask=torch.zeros(h.shape[:2], dtype=torch.bool))
        return self.aggregate(x[:, -1])


class _AuthorsDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(DV, DV // 2), nn.GELU(), nn.Dropout(0.1), nn.Linear(DV // 2, 1))

    def forward(self, z):
        return self.classifier(z).squeeze(-1)


class _AuthorsVLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_seeds = nn.Parameter(torch.randn(K, D) * 0.02)
        self.gate_alpha = nn.Parameter(torch.tensor([-2.0]))
        self.value_proj = nn.Sequential(nn.Linear(DV, D), nn.GELU(), nn.Linear(D, D))
        self.cross_attn = nn.MultiheadAttention(D, 8, dropout=0.1, batch_first=True)
        self.layer_norm = nn.LayerNorm(D)

    def forward(self, h, dz):  # h [B, 1, D]
        ctx = torch.cat([h, self.value_proj(dz)[:, None]], dim=1)
        q = self.query_seeds.expand(h.shape[0], -1, -1)
        a = self.cross_attn(q, ctx, ctx, need_weights=False)[0]
        return self.layer_norm(h.expand(-1, K, -1) + F.softplus(self.gate_alpha) * a)


class _AuthorsTokenGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.gating_alpha = nn.Parameter(torch.tensor([-2.0]))
        self.position_embeds = nn.Parameter(torch.randn(K, D) * 0.02)
        self.safe_bias = nn.Parameter(torch.randn(K, D) * 0.02)
        self.generator = nn.Sequential(nn.Linear(DV, 2 * D), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * D, K * D))

    def forward(self, h, dz):
        a = F.softplus(self.gating_alpha)
        tok = self.safe_bias + a * (self.generator(dz).view(-1, K, D) + self.position_embeds)
        return h.expand(-1, K, -1) + a * tok  # the generation script applies the gate a second time


def _authors_bridge(vt, disc, gen, h, step):
    z = vt.stage3(h[:, None])
    zg = z.detach().clone().requires_grad_(True)
    s = F.relu(disc(zg))
    g = torch.autograd.grad(s.sum(), zg)[0] if s.sum() > 0 else torch.zeros_like(zg)
    n = g.norm(dim=-1, keepdim=True)
    dz = (-(s[:, None] / (n + 1e-8)) * (g / (n + 1e-8)) * step).detach()
    return gen(h[:, None], dz)


def _fabricate(tmp_path, generator, nested=True):
    torch.manual_seed(11)
    vt, disc = _AuthorsValueTransformer().eval(), _AuthorsDiscriminator().eval()
    gen = (_AuthorsVLP() if generator == "vlp" else _AuthorsTokenGenerator()).eval()
    with torch.no_grad():
        for m in (vt, disc, gen):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        # Centre the scores of the probe inputs on 0, so rows fall on both sides of the relu.
        probe = torch.randn(8, D, generator=torch.Generator().manual_seed(5)) * 3
        disc.classifier[3].bias.sub_(disc(vt.stage3(probe[:, None])).median())
    parts2 = {"value_transformer": vt.state_dict(), "discriminator": disc.state_dict()}
    parts3 = dict(parts2, generator=gen.state_dict())
    extra = {"epoch": 4, "config": {"arch": {"value_dim": DV}}}
    if nested:
        s2 = dict(extra, model_state_dict=parts2, optimizer_state_dict={}, val_acc=0.91)
        s3 = dict(extra, model_state_dict=parts3, training_config={"gradient_step_size": 1.0, "use_gradient_delta": True})
    else:
        s2, s3 = dict(extra, **parts2), dict(extra, **parts3)
    torch.save(s2, tmp_path / "stage2_best.pt")
    torch.save(s3, tmp_path / "stage3_best.pt")
    return vt, disc, gen


def _config(generator="vlp"):
    return SVGTConfig(hidden_size=D, extract_layer=2, num_backbone_layers=5, value_dim=DV, n_heads=H,
                      n_intervention_tokens=K, generator=generator, vlp_n_heads=8)


@pytest.mark.parametrize("generator", ["vlp", "mlp"])
@pytest.mark.parametrize("nested", [True, False])
def test_convert_matches_authors_math(tmp_path, generator, nested):
    vt, disc, gen = _fabricate(tmp_path, generator, nested)
    out = tmp_path / "converted"
    convert_reference_checkpoint(tmp_path / "stage2_best.pt", tmp_path / "stage3_best.pt", _config(generator), out)
    module = SVGTModule.from_pretrained(out)
    record = json.loads((out / "conversion.json").read_text())
    assert "value_transformer.cross_scale" in record["dropped_stage2_only_keys"]
    assert any(k.startswith("value_transformer.response_proj") for k in record["dropped_stage2_only_keys"])
    h = torch.randn(8, D, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        ours = module.bridge(h, 1.0)
    want = _authors_bridge(vt, disc, gen, h, 1.0)
    s = disc(vt.stage3(h[:, None]))
    assert (s > 0).any() and (s < 0).any(), "need rows on both sides of the relu"
    torch.testing.assert_close(ours, want.detach(), rtol=1e-5, atol=1e-5)


def test_convert_dict_config_and_cli(tmp_path):
    _fabricate(tmp_path, "vlp")
    from svgt_fast.cli import main

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(_config().to_dict()))
    rc = main(["convert", str(tmp_path / "stage2_best.pt"), str(tmp_path / "stage3_best.pt"),
               "--config", str(cfg_file), "--out", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_convert_errors(tmp_path):
    vt, disc, gen = _fabricate(tmp_path, "vlp")
    s2, s3 = tmp_path / "stage2_best.pt", tmp_path / "stage3_best.pt"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert_reference_checkpoint(tmp_path / "nope.pt", s3, _config(), tmp_path / "o")
    with pytest.raises(ValueError, match="holds a 'vlp' generator"):
        convert_reference_checkpoint(s2, s3, _config("mlp"), tmp_path / "o")
    # A missing key is named.
    ck = torch.load(s2, weights_only=True)
    del ck["model_state_dict"]["discriminator"]["classifier.0.bias"]
    torch.save(ck, tmp_path / "s2_missing.pt")
    with pytest.raises(ValueError, match=r"missing keys \['discriminator.classifier.0.bias'\]"):
        convert_reference_checkpoint(tmp_path / "s2_missing.pt", s3, _config(), tmp_path / "o")
    # An unknown key is not dropped silently.
    ck = torch.load(s2, weights_only=True)
    ck["model_state_dict"]["value_transformer"]["mystery.weight"] = torch.zeros(2)
    torch.save(ck, tmp_path / "s2_extra.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_reference_checkpoint(tmp_path / "s2_extra.pt", s3, _config(), tmp_path / "o")
    # No generator in stage 3.
    torch.save({"model_state_dict": {"value_transformer": vt.state_dict()}}, tmp_path / "s3_nogen.pt")
    with pytest.raises(ValueError, match="no 'generator' state dict"):
        convert_reference_checkpoint(s2, tmp_path / "s3_nogen.pt", _config(), tmp_path / "o")
    # A pickle that needs code to load is refused, never executed.
    torch.save({"model_state_dict": {"value_transformer": vt}}, tmp_path / "s2_module.pt")
    with pytest.raises(ValueError, match="weights-only"):
        convert_reference_checkpoint(tmp_path / "s2_module.pt", s3, _config(), tmp_path / "o")
    assert not (tmp_path / "o").exists()
