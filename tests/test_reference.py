"""The eager SVGT oracle (DESIGN §1): HF parity unsteered, two independent formulations that
agree steered, refresh / trigger semantics, ragged batches and seeded sampling."""
import dataclasses

import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.reference import generate_row
from svgt_fast.sampling import SamplingParams
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts

N_NEW = 10


def _left_padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _right_padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_unsteered_greedy_equals_hf_generate(tiny_model):
    ids, mask = _left_padded(ragged_prompts(1), pad=256)
    hf = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False)
    ours = generate(tiny_model, ids, attention_mask=mask, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(ours.sequences, hf)
    # EOS: take a token the first row produces mid-way and make it the EOS.
    eos = int(ours.new_tokens[0, 3])
    hf = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=eos, pad_token_id=256)
    ours = generate(tiny_model, ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=256,
                    engine="reference")
    assert torch.equal(ours.sequences, hf)
    first_eos = ours.new_tokens[0].tolist().index(eos)
    assert int(ours.num_new_tokens[0]) == first_eos + 1
    assert torch.all(ours.new_tokens[0, first_eos + 1:] == 256)


def test_padding_side_does_not_change_tokens(tiny_models):
    model = tiny_models["qwen2"]
    module = build_value_module(model, seed=1)
    rows = ragged_prompts(2)
    for steering in (None, SVGT(module, refresh_interval=3)):
        left = generate(model, *_left_padded(rows, 256)[:1], attention_mask=_left_padded(rows, 256)[1],
                        steering=steering, max_new_tokens=N_NEW, engine="reference")
        right = generate(model, _right_padded(rows, 256)[0], attention_mask=_right_padded(rows, 256)[1],
                         steering=steering, max_new_tokens=N_NEW, engine="reference")
        lists = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
        assert torch.equal(left.new_tokens, right.new_tokens)
        assert torch.equal(left.new_tokens, lists.new_tokens)


def _run(model, prompt, steering, formulation, n=N_NEW, sampling=SamplingParams(), seed=0):
    trace = []
    toks = generate_row(model, torch.tensor(prompt), steering=steering, max_new_tokens=n, sampling=sampling,
                        row_seed=seed, eos_ids=frozenset(), formulation=formulation, trace=trace)
    return toks, trace


@pytest.mark.parametrize("generator", ["vlp", "mlp"])
@pytest.mark.parametrize("trigger", ["current", "prompt"])
def test_loop_and_hook_formulations_agree(tiny_model, generator, trigger):
    module = build_value_module(tiny_model, seed=3, generator=generator)
    steering = SVGT(module, refresh_interval=3, beta=0.6, trigger=trigger)
    prompt = ragged_prompts(4, lengths=(9,))[0]
    toks_loop, tr_loop = _run(tiny_model, prompt, steering, "loop")
    toks_hook, tr_hook = _run(tiny_model, prompt, steering, "hook")
    assert toks_loop == toks_hook
    for a, b in zip(tr_loop, tr_hook):
        torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a["bridge"], b["bridge"], rtol=1e-5, atol=1e-5)


def test_steering_changes_the_first_token_somewhere(tiny_models):
    """The bridge is read from the first response token on (logits come from the last bridge)."""
    changed = 0
    for fam, model in tiny_models.items():
        module = build_value_module(model, seed=2)
        for prompt in ragged_prompts(5, lengths=(4, 6, 8, 10)):
            plain, _ = _run(model, prompt, None, "loop", n=1)
            steered, _ = _run(model, prompt, SVGT(module), "loop", n=1)
            changed += plain != steered
    assert changed > 0


def test_refresh_semantics(tiny_models):
    model = tiny_models["llama"]
    module = build_value_module(model, seed=4)
    prompt = ragged_prompts(6, lengths=(8,))[0]
    base = SVGT(module, refresh_interval=2, beta=0.5, trigger="current")
    _, tr = _run(model, prompt, base, "loop")
    bridges = [t["bridge"] for t in tr]
    # The bridge changes exactly at steps 2, 4, 6, ... and nowhere else.
    for t in range(1, N_NEW):
        same = torch.equal(bridges[t], bridges[t - 1])
        assert same == (t % 2 != 0), f"step {t}"
    # Each refresh is the EMA of the old bridge and a fresh one from the newest token's state.
    from svgt_fast.reference import _lower_loop

    toks, _ = _run(model, prompt, base, "loop")
    seq = torch.tensor(prompt + toks[:4])  # step 4 reads the newest token: response token 3
    hidden = _lower_loop(model, seq, module.config.extract_layer)
    fresh = module.bridge(hidden[-1][None], 1.0)[0]
    torch.testing.assert_close(bridges[4], 0.5 * bridges[3] + 0.5 * fresh, rtol=1e-6, atol=1e-6)

    # beta = 1 keeps the prefill bridge forever: same as never refreshing.
    frozen, _ = _run(model, prompt, dataclasses.replace(base, beta=1.0), "loop")
    never, _ = _run(model, prompt, dataclasses.replace(base, refresh_interval=10_000), "loop")
    assert frozen == never
    # trigger="prompt", beta=0, refresh every step: recomputes the same prefill bridge.
    _, tr_p = _run(model, prompt, SVGT(module, refresh_interval=1, beta=0.0, trigger="prompt"), "loop")
    # (Not bit-equal: the prompt token's state is re-computed inside a longer fp32 forward.)
    for t in tr_p[1:]:
        torch.testing.assert_close(t["bridge"], tr_p[0]["bridge"], rtol=1e-5, atol=1e-5)


def test_gradient_step_changes_bridge(tiny_models):
    model = tiny_models["mistral"]
    module = build_value_module(model, seed=5)
    with torch.no_grad():  # make the discriminator call every state unsafe so δz != 0
        module.discriminator.classifier[3].bias.fill_(50.0)
    prompt = ragged_prompts(7, lengths=(6,))[0]
    _, a = _run(model, prompt, SVGT(module, gradient_step_size=0.0), "loop", n=1)
    _, b = _run(model, prompt, SVGT(module, gradient_step_size=3.0), "loop", n=1)
    assert not torch.allclose(a[0]["bridge"], b[0]["bridge"])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_rows_equal_single_runs(tiny_models, temperature):
    model = tiny_models["qwen3"]
    steering = SVGT(build_value_module(model, seed=6), refresh_interval=4)
    rows = ragged_prompts(8)
    kw = dict(steering=steering, max_new_tokens=N_NEW, temperature=temperature, top_p=0.9, seed=123,
              engine="reference")
    batch = generate(model, rows, **kw)
    for i, r in enumerate(rows):
        alone = generate(model, [r], **dict(kw, seed=123 + i))
        assert alone.new_tokens[0].tolist() == batch.new_tokens[i, : alone.new_tokens.shape[1]].tolist()
    again = generate(model, rows, **kw)
    assert torch.equal(again.new_tokens, batch.new_tokens)
    if temperature > 0:
        other = generate(model, rows, **dict(kw, seed=999))
        assert not torch.equal(other.new_tokens, batch.new_tokens)
