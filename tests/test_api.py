"""`svgt_fast.generate` input checks: each bad input is a clear error naming the problem."""
import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.tiny import build_value_module, byte_tokenizer


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def test_text_prompts_with_tokenizer(llama):
    tok = byte_tokenizer()
    out = generate(llama, ["hi there", "a"], tokenizer=tok, max_new_tokens=4)
    assert len(out.texts) == 2 and out.new_tokens.shape == (2, 4)
    ids = torch.tensor([tok("hi there")["input_ids"]])
    assert torch.equal(generate(llama, ids, max_new_tokens=4).new_tokens[0], out.new_tokens[0])


def test_zero_new_tokens_returns_prompt(llama):
    ids = torch.tensor([[5, 6, 7]])
    out = generate(llama, ids, max_new_tokens=0)
    assert torch.equal(out.sequences, ids) and out.new_tokens.shape == (1, 0)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda m: generate(m, torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2), ValueError, "empty prompt"),
    (lambda m: generate(m, [[1, 2], []], max_new_tokens=2), ValueError, "empty prompt"),
    (lambda m: generate(m, "", tokenizer=byte_tokenizer(), max_new_tokens=2), ValueError, "empty prompt"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=2),
     ValueError, "empty prompt"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=-1), ValueError, "max_new_tokens"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (lambda m: generate(m, torch.ones((1, 250), dtype=torch.long), max_new_tokens=10), ValueError, "context is 256"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, temperature=0.7), ValueError, "seed"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, top_p=0.0), ValueError, "top_p"),
    (lambda m: generate(m, torch.tensor([[1, 999]]), max_new_tokens=2), ValueError, "vocabulary"),
    (lambda m: generate(m, torch.tensor([[1.0, 2.0]]), max_new_tokens=2), ValueError, "int64"),
    (lambda m: generate(m, "hello", max_new_tokens=2), ValueError, "tokenizer"),
    (lambda m: generate(m, torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]), max_new_tokens=2),
     ValueError, "holes"),
    (lambda m: generate(m, torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1]]), max_new_tokens=2),
     ValueError, "does not match"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, engine="warp"), ValueError, "engine"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, steering="svgt"), TypeError, "steering"),
])
def test_bad_input(llama, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(llama)


def test_prompt_plus_bridge_beyond_context(llama):
    steering = SVGT(build_value_module(llama))
    ids = torch.ones((1, 246), dtype=torch.long)
    generate(llama, ids, max_new_tokens=10, steering=None, eos_token_id=[])  # 256 fits unsteered
    with pytest.raises(ValueError, match="needs 261 positions"):
        generate(llama, ids, max_new_tokens=10, steering=steering)


def test_module_for_another_backbone(tiny_models):
    steering = SVGT(build_value_module(tiny_models["qwen2"]))
    with pytest.raises(ValueError, match="does not fit this backbone"):
        generate(tiny_models["llama"], torch.tensor([[1, 2]]), max_new_tokens=2, steering=steering)


@pytest.mark.parametrize("kw,msg", [
    (dict(refresh_interval=0), "refresh_interval"), (dict(beta=1.5), "beta"),
    (dict(trigger="token"), "trigger"), (dict(gradient_step_size=-1.0), "gradient_step_size"),
])
def test_bad_steering_options(llama, kw, msg):
    with pytest.raises(ValueError, match=msg):
        SVGT(build_value_module(llama), **kw)
    with pytest.raises(TypeError, match="SVGTModule"):
        SVGT(object())


def test_sliding_window_beyond_window_is_refused(tmp_path):
    from svgt_fast.tiny import build_tiny_model

    model = build_tiny_model("mistral", seed=1, sliding_window=16)
    generate(model, torch.ones((1, 8), dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match="sliding window of 16"):
        generate(model, torch.ones((1, 8), dtype=torch.long), max_new_tokens=9)


def test_ragged_and_text_prompts_are_left_padded_with_the_pad_id(tiny_models):
    """sequences of ragged lists: the padding generate added is the pad id (it was 0, a real
    token id); a [B, P] tensor keeps the padding it came with."""
    model = tiny_models["llama"]
    out = generate(model, [[5, 6, 7], [8]], max_new_tokens=2, pad_token_id=-100, eos_token_id=[])
    assert out.sequences[:, :3].tolist() == [[5, 6, 7], [-100, -100, 8]]
    assert torch.equal(out.sequences[:, 3:], out.new_tokens)
    ids = torch.tensor([[5, 6, 7], [0, 0, 8]])
    given = generate(model, ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 1]]), max_new_tokens=2,
                     pad_token_id=-100, eos_token_id=[])
    assert torch.equal(given.sequences[:, :3], ids) and torch.equal(given.new_tokens, out.new_tokens)
