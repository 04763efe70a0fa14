"""Our own forward of the supported decoder families, on the HF model's own weights.

Llama, Mistral, Qwen2/2.5 and Qwen3: RMSNorm, RoPE (cos/sin tables taken from the model's own
rotary module, so every scaling variant the model supports — llama3, linear, dynamic, yarn — is
reproduced exactly; "dynamic" and "longrope", whose frequencies HF recomputes from the sequence
length, within the lengths that keep them fixed — longer requests are refused), GQA, SwiGLU, q/k RMSNorm (Qwen3) and q/k/v bias (Qwen2). The q/k/v and
gate/up weights are fused once; the HF modules' parameters become views of the fused tensors,
so no weight is held twice and the HF model stays usable as the correctness oracle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backbone import backbone_info, backbone_parts


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) * D, d]
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w_gate_up: torch.Tensor  # [2 I, d]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None


def _already_fused(tensors) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks these are, if an earlier fusion made them so
    (a second Engine on the same model): it is used as it is, so the engines share the weights
    and the first one keeps reading the ones the model holds."""
    t0 = tensors[0]
    if t0.dim() not in (1, 2) or not t0.is_contiguous():
        return None
    row_len = t0.shape[1] if t0.dim() == 2 else 1
    offset, rows = t0.storage_offset(), 0
    for t in tensors:
        if (t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:] or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                or t.storage_offset() != offset + rows * row_len):
            return None
        rows += t.shape[0]
    size, stride = ((rows, row_len), (row_len, 1)) if t0.dim() == 2 else ((rows,), (1,))
    return t0.detach().as_strided(size, stride, offset)


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the row blocks of several Linear layers and re-point them at views of it."""
    with torch.no_grad():
        has_bias = [l.bias is not None for l in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("mixed bias / no-bias projections cannot be fused")
        w = _already_fused([l.weight for l in linears])
        b = _already_fused([l.bias for l in linears]) if all(has_bias) else None
        if w is not None and (b is not None or not any(has_bias)):
            return w, b
        w = torch.cat([l.weight for l in linears], dim=0).contiguous()
        b = torch.cat([l.bias for l in linears]).contiguous() if all(has_bias) else None
        row = 0
        for l in linears:
            n = l.weight.shape[0]
            l.weight.data = w[row:row + n]
            if b is not None:
                l.bias.data = b[row:row + n]
            row += n
    return w, b


@dataclass
class ModelWeights:
    """Weights and shapes of one backbone, read from (and aliased with) its HF modules."""

    layers: list[LayerWeights]
    embed: torch.Tensor
    final_norm: torch.Tensor
    final_eps: float
    lm_head: torch.Tensor
    lm_head_bias: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    scale: float
    rotary: torch.nn.Module
    rope_fixed_positions: int | None  # BackboneInfo.rope_fixed_positions
    # (name, owner module, parameter name, the parameter read, its data_ptr then): see replaced()
    sources: list = field(default_factory=list)

    @classmethod
    def from_hf(cls, model) -> "ModelWeights":
        info = backbone_info(model)
        inner, layers, lm_head = backbone_parts(model)
        cfg = model.config
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
        out = []
        for layer in layers:
            att, mlp = layer.self_attn, layer.mlp
            wqkv, bqkv = _fuse([att.q_proj, att.k_proj, att.v_proj])
            w_gu, b_gu = _fuse([mlp.gate_proj, mlp.up_proj])
            q_norm = getattr(att, "q_norm", None)
            k_norm = getattr(att, "k_norm", None)
            out.append(LayerWeights(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                eps=float(layer.input_layernorm.variance_epsilon),
                wqkv=wqkv, bqkv=bqkv,
                q_norm=None if q_norm is None else q_norm.weight, k_norm=None if k_norm is None else k_norm.weight,
                wo=att.o_proj.weight, bo=att.o_proj.bias,
                w_gate_up=w_gu, b_gate_up=b_gu, w_down=mlp.down_proj.weight, b_down=mlp.down_proj.bias,
            ))
        att0 = layers[0].self_attn
        head_dim = int(att0.head_dim)
        return cls(
            layers=out, embed=inner.embed_tokens.weight, final_norm=inner.norm.weight,
            final_eps=float(inner.norm.variance_epsilon), lm_head=lm_head.weight,
            lm_head_bias=getattr(lm_head, "bias", None),
            n_heads=int(cfg.num_attention_heads), n_kv_heads=int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)),
            head_dim=head_dim, hidden_size=info.hidden_size, scale=float(att0.scaling), rotary=inner.rotary_emb,
            rope_fixed_positions=info.rope_fixed_positions, sources=_sources(model),
        )

    def replaced(self) -> str | None:
        """The name of the first parameter read here that the model no longer holds as it was:
        assigned anew, or its data replaced (`.data = ...`, `model.to(dtype or device)`). The
        weights are read once, and the fused q/k/v and gate/up are copies, so such a change
        would otherwise go unseen (or fail deep inside a GEMM). ~0.1 ms at the 8B shape."""
        for name, owner, attr, held, ptr in self.sources:
            now = owner._parameters.get(attr)
            if now is not held or now.data_ptr() != ptr:
                return name
        return None

    def rope_tables(self, n_positions: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n_positions, D] from the model's own rotary module (in the model dtype, as HF).

        A rope whose frequencies depend on the sequence length is asked only for the positions
        that keep them fixed (a longer ask would switch every position to the long-sequence
        frequencies and leave the HF module in that state); the rows past them stay zero, as no
        admitted request reaches them (backbone.check_total_length)."""
        dummy = torch.empty((1, 1, self.head_dim), device=device, dtype=dtype)
        n = n_positions
        if self.rope_fixed_positions is not None:
            self.rotary(dummy, position_ids=torch.zeros(1, 1, dtype=torch.long, device=device))  # HF's own reset to the fixed frequencies
            n = min(n_positions, self.rope_fixed_positions)
        cos, sin = self.rotary(dummy, position_ids=torch.arange(n, device=device)[None])
        if n < n_positions:
            pad = (0, 0, 0, n_positions - n)
            return F.pad(cos[0], pad).contiguous(), F.pad(sin[0], pad).contiguous()
        return cos[0].contiguous(), sin[0].contiguous()


def _sources(model) -> list:
    """Every parameter of the model (those ModelWeights reads among them), as (name, owner,
    attr, parameter, data_ptr)."""
    out = []
    for prefix, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((f"{prefix}.{attr}" if prefix else attr, mod, attr, p, p.data_ptr()))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, M, H, D]; cos/sin [B, M, D] (rotate-half convention)."""
    c, s = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def qkv_projection(w: LayerWeights, mw: ModelWeights, x: torch.Tensor):
    """x [B, M, d] -> normalised input; q [B, M, Hq, D], k, v [B, M, Hkv, D] (pre-RoPE)."""
    h = rms_norm(x, w.ln1, w.eps)
    qkv = F.linear(h, w.wqkv, w.bqkv)
    B, M = x.shape[:2]
    D, Hq, Hkv = mw.head_dim, mw.n_heads, mw.n_kv_heads
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, M, Hq, D), k.view(B, M, Hkv, D), v.view(B, M, Hkv, D)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, w.eps)
        k = rms_norm(k, w.k_norm, w.eps)
    return q, k, v


def attention_output_and_mlp(w: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual adds around o_proj and the SwiGLU MLP. attn [B, M, Hq * D]."""
    x = x + F.linear(attn, w.wo, w.bo)
    h = rms_norm(x, w.ln2, w.eps)
    gate, up = F.linear(h, w.w_gate_up, w.b_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.w_down, w.b_down)


def logits_from_hidden(mw: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(rms_norm(x, mw.final_norm, mw.final_eps), mw.lm_head, mw.lm_head_bias)
