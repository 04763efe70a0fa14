"""RE-Control (issue 6): the closed-form gradient against autograd, the fast engine against the
hooked HF reference, mixing with SVGT rows, the Bellman fit, the artifact and bad input."""
import json

import pytest
import torch

from svgt_fast import SVGT, Engine, REControl, REControlConfig, REControlValue, fit_re_control, generate
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts

N_NEW = 10


def _value_fn(model, seed, activation="relu", scale=1.0):
    torch.manual_seed(seed)
    vf = REControlValue(REControlConfig(model.config.hidden_size, [48, 24], activation))
    with torch.no_grad():
        for p in vf.parameters():
            p.mul_(scale)
    return vf


@pytest.mark.parametrize("activation", ["relu", "tanh", "silu"])
def test_closed_form_gradient_equals_autograd(activation):
    vf = REControlValue(REControlConfig(32, [40, 16, 8], activation)).double()
    h = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    v, g = vf.value_and_grad(h.detach())
    (auto,) = torch.autograd.grad(vf(h).sum(), h)
    torch.testing.assert_close(v, vf(h).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "qwen3"])
def test_engine_equals_hooked_reference(tiny_models, fam):
    model = tiny_models[fam]
    steering = REControl(_value_fn(model, 1, "tanh", scale=3.0), n_steps=5, step_size=2.0)
    rows = ragged_prompts(80, lengths=(5, 9, 2))
    fast = generate(model, rows, steering=steering, max_new_tokens=N_NEW)
    ref = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    plain = generate(model, rows, max_new_tokens=N_NEW)
    assert (plain.new_tokens != fast.new_tokens).any()  # the edit changes the output


def test_zero_steps_is_unsteered(tiny_models):
    model = tiny_models["mistral"]
    rows = ragged_prompts(81, lengths=(4, 6))
    out = generate(model, rows, steering=REControl(_value_fn(model, 2), n_steps=0), max_new_tokens=N_NEW)
    assert torch.equal(out.new_tokens, generate(model, rows, max_new_tokens=N_NEW).new_tokens)


@pytest.mark.parametrize("attention", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_mixed_with_svgt_rows_equal_alone(tiny_models, attention):
    model = tiny_models["llama"]
    rc = REControl(_value_fn(model, 3, "silu", scale=3.0), n_steps=3, step_size=2.0)
    sv = SVGT(build_value_module(model, seed=82), refresh_interval=2, refresh="bridge")
    steerings = [rc, None, sv, rc]
    rows = ragged_prompts(82, lengths=(5, 7, 3, 8))
    eng = Engine(model, max_batch=4, max_seq_len=32, attention=attention)
    mixed = generate(model, rows, steering=steerings, max_new_tokens=8, engine=eng)
    for i, (row, st) in enumerate(zip(rows, steerings)):
        alone = generate(model, [row], steering=st, max_new_tokens=8, engine="reference")
        assert mixed.new_tokens[i].tolist() == alone.new_tokens[0].tolist(), (attention, i)


GOOD, BAD = [11, 12, 13], [21, 22, 23]


def _write_data(path, model, n=24, seed=0):
    """Random prompts and responses; reward +1 when the response ends in a GOOD token, -1 when in
    a BAD one (a random backbone's last state carries its last token, so this is learnable)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            last = (GOOD if good else BAD)[int(torch.randint(0, 3, (1,), generator=g))]
            f.write(json.dumps({"prompt": torch.randint(0, V, (5,), generator=g).tolist(),
                                "response": torch.randint(0, V, (5,), generator=g).tolist() + [last],
                                "reward": 1.0 if good else -1.0}) + "\n")


def test_fit_learns_the_training_rewards_and_round_trips(tiny_models, tmp_path):
    """The Bellman fit (targets, optimisation, artifact) works: on its training data every end
    state gets the sign of its reward and values propagate back along each response. Whether it
    generalises is measured on a trained backbone (issue 7's efficacy benchmark), not here."""
    from svgt_fast.re_control import _states, read_reward_rows

    model = tiny_models["llama"]
    data = tmp_path / "data.jsonl"
    _write_data(data, model)
    vf = fit_re_control(model, str(data), hidden_dims=[64], epochs=100, lr=3e-3, progress=False,
                        out_dir=tmp_path / "rc")
    assert vf.last_loss < 0.1
    traj = _states(model, read_reward_rows(str(data)))
    with torch.no_grad():
        for h, r in traj:
            v = vf(h)
            assert v[-1] * r > 0.5  # the end state carries the reward
            assert v[-2] * r > 0  # one step back: gamma * V(end) propagated
    loaded = REControlValue.from_pretrained(tmp_path / "rc")
    h = torch.randn(3, model.config.hidden_size)
    assert torch.equal(loaded(h), vf(h))


def test_bad_input(tiny_models, tmp_path):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match="activation"):
        REControlConfig(16, [8], "gelu")
    with pytest.raises(ValueError, match="n_steps"):
        REControl(_value_fn(model, 4), n_steps=-1)
    with pytest.raises(TypeError, match="REControlValue"):
        REControl(build_value_module(model, seed=4))
    wrong = REControlValue(REControlConfig(model.config.hidden_size + 8, [8]))
    with pytest.raises(ValueError, match="hidden size"):
        generate(model, [[1, 2, 3]], steering=REControl(wrong), max_new_tokens=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [1, 2], "response": [3]}\n')
    with pytest.raises(ValueError, match="reward"):
        fit_re_control(model, str(bad), progress=False)
    # The reader shared with the SVGT trainer (svgt_fast.jsonl_rows): rows named, ids checked.
    from svgt_fast.re_control import read_reward_rows
    for row, msg in (({"prompt": [1], "response": [2], "reward": float("nan")}, "finite"),
                     ({"prompt": [1], "response": [2], "reward": "1"}, "finite"),
                     ({"prompt": [1, -2], "response": [2], "reward": 1.0}, "prompt must be non-empty"),
                     ({"prompt": "a b", "response": [2], "reward": 1.0}, "needs a tokenizer")):
        with pytest.raises(ValueError, match=msg) as err:
            read_reward_rows([{"prompt": [1], "response": [2], "reward": 0.5}, row])
        assert "row 1" in str(err.value)
    with pytest.raises(ValueError, match="no rows"):
        read_reward_rows([])
    assert read_reward_rows([{"prompt": [1], "response": [2, 3], "reward": 1, "note": "x"}]) == [([1], [2, 3], 1.0)]
    with pytest.raises(FileNotFoundError):
        fit_re_control(model, str(tmp_path / "none.jsonl"), progress=False)
    with pytest.raises(FileNotFoundError):
        REControlValue.from_pretrained(tmp_path / "missing")
