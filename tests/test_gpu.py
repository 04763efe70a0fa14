"""GPU checks (skipped without CUDA): the Triton + CUDA-graph engine against the oracle, and the
bf16 bar of issue 3 on random weights of the Llama-3-8B shape."""
import sys
from pathlib import Path

import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import ragged_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("steered", [False, True])
def test_graphed_triton_engine_equals_reference_fp32(steered):
    model = build_tiny_model("qwen3", seed=30).cuda()
    steering = SVGT(build_value_module(model, seed=30), refresh_interval=3) if steered else None
    rows = ragged_prompts(30, lengths=(5, 9, 14))
    ref = generate(model, rows, steering=steering, max_new_tokens=16, engine="reference")
    eng = Engine(model, max_batch=4, max_seq_len=64)
    assert eng.attention == "triton" and eng.cuda_graphs
    for _ in range(2):  # second call replays the captured graphs
        fast = generate(model, rows, steering=steering, max_new_tokens=16, engine=eng)
        assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
        assert fast.timings["graph_steps"] > 0


def test_bf16_8b_shape_logits_and_greedy():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shapes import build_model

    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (64, 100)]
    # Reference errors: HF bf16 against HF fp32 (same weights).
    with torch.no_grad():
        hf_bf16 = torch.stack([model(input_ids=p[None].cuda()).logits[0, -1].float() for p in prompts])
    eng = Engine(model, max_batch=2, max_seq_len=256)
    ours = eng.prefill_logits(prompts).float()
    fast = generate(model, [p.tolist() for p in prompts], max_new_tokens=32, engine=eng, eos_token_id=[])
    hf_tokens = [model.generate(input_ids=p[None].cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, p.shape[0]:].cpu() for p in prompts]
    model.float()
    with torch.no_grad():
        hf_fp32 = torch.stack([model(input_ids=p[None].cuda()).logits[0, -1] for p in prompts])
    hf_err = (hf_bf16 - hf_fp32).abs().max()
    our_err = (ours - hf_fp32).abs().max()
    assert our_err <= 2 * hf_err, f"engine bf16 error {our_err} vs HF bf16 error {hf_err}"
    for i, t in enumerate(hf_tokens):
        assert torch.equal(fast.new_tokens[i].cpu(), t), f"row {i} diverges from HF bf16 greedy"
