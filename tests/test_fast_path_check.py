"""The fast engine runs its own forward on the backbone's weights, never the modules' forwards:
what a module forward adds — an adapter injected in place (as PEFT does), a quantized weight, a
forward hook — it would leave out silently. Such models are refused, at Engine construction and
at every call (an adapter or hook may arrive after the engine exists); engine="reference" runs
the modules' own forwards and honours them."""
import threading

import pytest
import torch
from torch import nn

from svgt_fast import generate
from svgt_fast.backbone import fast_path_problems
from svgt_fast.engine import Engine
from svgt_fast.tiny import build_tiny_model

from helpers import intervention, ragged_prompts, random_artifact

REFUSED = "the fast engine runs its own forward on the backbone's weights and would silently skip"


class LoraLinear(nn.Module):
    """What PEFT injects in place of a projection: the frozen base plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=1.0)

    @property
    def weight(self):  # PEFT's layers expose the base weight too, which is why reading it is not enough
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.fixture
def model(tmp_path):
    return build_tiny_model("llama", seed=31, directory=str(tmp_path), num_hidden_layers=8)  # ConVA steers layers 0-1


def test_a_plain_model_has_no_problems(tiny_model):
    assert fast_path_problems(tiny_model) == []


def test_an_adapter_injected_after_the_engine_exists_is_refused(model):
    rows = ragged_prompts(31, lengths=(5, 8))
    eng = Engine(model, max_batch=2, max_seq_len=32)
    plain = generate(model, rows, max_new_tokens=6, engine=eng)
    attn = model.model.layers[1].self_attn
    attn.q_proj = LoraLinear(attn.q_proj)
    with pytest.raises(ValueError, match=REFUSED) as err:
        generate(model, rows, max_new_tokens=6, engine=eng)
    assert "model.layers.1.self_attn.q_proj is a test_fast_path_check.LoraLinear, not torch.nn.Linear" in str(err.value)
    with pytest.raises(ValueError, match="merge_and_unload"):
        generate(model, rows, max_new_tokens=6)  # the engine generate caches per model
    with pytest.raises(ValueError, match=REFUSED):
        Engine(model, max_batch=2, max_seq_len=32)  # refused before fusing any weight
    adapted = generate(model, rows, max_new_tokens=6, engine="reference")
    assert not torch.equal(adapted.new_tokens, plain.new_tokens)  # the adapter changes the tokens


def test_quantized_weights_are_refused(model):
    down = model.model.layers[0].mlp.down_proj
    down.weight = nn.Parameter(torch.zeros_like(down.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight is a Parameter of dtype torch.int8"):
        Engine(model, max_batch=1, max_seq_len=16)


def test_forward_hooks_are_refused_until_removed(model):
    rows = ragged_prompts(32, lengths=(4, 9))
    eng = Engine(model, max_batch=2, max_seq_len=32)
    want = generate(model, rows, max_new_tokens=6, engine=eng)
    calls = []

    def scale_mlp(_mod, _args, out):
        calls.append(1)
        return out * 1.5

    handle = model.model.layers[2].mlp.register_forward_hook(scale_mlp)
    try:
        with pytest.raises(ValueError, match=r"model.layers.2.mlp has a forward hook \(.*scale_mlp\)"):
            generate(model, rows, max_new_tokens=6, engine=eng)
        hooked = generate(model, rows, max_new_tokens=6, engine="reference")
        assert calls and not torch.equal(hooked.new_tokens, want.new_tokens)
    finally:
        handle.remove()
    assert torch.equal(generate(model, rows, max_new_tokens=6, engine=eng).new_tokens, want.new_tokens)

    handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, args: None)
    try:
        with pytest.raises(ValueError, match=r"a global forward hook \(.*<lambda>\) is registered"):
            generate(model, rows, max_new_tokens=6, engine=eng)
    finally:
        handle.remove()


def test_transformers_output_recorders_are_not_refused(model):
    """Any output_hidden_states=True forward installs HF's output-recording hooks for good; they
    record only while HF collects outputs and change no value."""
    rows = ragged_prompts(34, lengths=(5, 7))
    want = generate(model, rows, max_new_tokens=6).new_tokens
    model(torch.tensor([rows[0]]), output_hidden_states=True)
    recorders = [m for m in model.modules() if m._forward_hooks]
    assert recorders, "this transformers installs no recorders: the test checked nothing"
    assert fast_path_problems(model) == []
    assert torch.equal(generate(model, rows, max_new_tokens=6).new_tokens, want)


def test_the_reference_engines_own_hooks_do_not_stop_fast_calls(model):
    """The reference engine hooks the model while it runs (ConVA's edit here); a fast call on the
    same model from another thread meanwhile must not take those hooks for the user's."""
    rows = ragged_prompts(33, lengths=(6,))
    conva = intervention("conva", random_artifact(model, "conva", seed=3))
    eng = Engine(model, max_batch=1, max_seq_len=48)
    want = generate(model, rows, max_new_tokens=4, engine=eng).new_tokens
    stop, errors, seen_hooked = threading.Event(), [], []

    def reference_calls():
        try:
            while not stop.is_set():
                generate(model, rows, steering=conva, max_new_tokens=20, engine="reference")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=reference_calls)
    t.start()
    try:
        for _ in range(30):
            layers = model.model.layers
            seen_hooked.append(any(m._forward_hooks or m._forward_pre_hooks for m in layers))
            assert torch.equal(generate(model, rows, max_new_tokens=4, engine=eng).new_tokens, want)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors, errors
    assert any(seen_hooked), "the reference engine's hooks were never seen: the test checked nothing"


def test_weights_replaced_after_the_engine_was_built(model):
    """The engine reads the weights once (q/k/v and gate/up fused, the model's views of them): an in-place
    update (load_state_dict) reaches it, a replaced parameter or its data is refused by an
    explicit Engine and makes generate's cached engine read the weights anew."""
    rows = ragged_prompts(35, lengths=(6, 3))
    eng = Engine(model, max_batch=2, max_seq_len=32)
    generate(model, rows, max_new_tokens=6, engine=eng)
    model.load_state_dict(build_tiny_model("llama", seed=36, num_hidden_layers=8).state_dict())  # copy_ in place
    ref = generate(model, rows, max_new_tokens=6, engine="reference")
    assert torch.equal(generate(model, rows, max_new_tokens=6, engine=eng).new_tokens, ref.new_tokens)

    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight.data = torch.randn_like(q.weight)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight was replaced since this Engine"):
        generate(model, rows, max_new_tokens=6, engine=eng)
    ref = generate(model, rows, max_new_tokens=6, engine="reference")
    assert torch.equal(generate(model, rows, max_new_tokens=6).new_tokens, ref.new_tokens)  # generate's own engine
    eng = Engine(model, max_batch=2, max_seq_len=32)
    assert torch.equal(generate(model, rows, max_new_tokens=6, engine=eng).new_tokens, ref.new_tokens)

    norm = model.model.layers[3]
    norm.input_layernorm.weight = nn.Parameter(norm.input_layernorm.weight * 2)
    with pytest.raises(ValueError, match=r"model.layers.3.input_layernorm.weight was replaced"):
        generate(model, rows, max_new_tokens=6, engine=eng)

    model.to(torch.float64)  # every parameter's data replaced; the cached engine follows
    ref = generate(model, rows, max_new_tokens=6, engine="reference")
    assert torch.equal(generate(model, rows, max_new_tokens=6).new_tokens, ref.new_tokens)


def test_engines_on_one_model_share_the_fused_weights(model):
    """A second Engine (or generate's own) on a model already fused reads the same tensors: no
    second copy, and the first engine is not refused as if its weights were replaced."""
    rows = ragged_prompts(37, lengths=(5, 7))
    ref = generate(model, rows, max_new_tokens=6, engine="reference").new_tokens
    first = Engine(model, max_batch=2, max_seq_len=32)
    att, mlp = model.model.layers[2].self_attn, model.model.layers[2].mlp
    before = [p.data_ptr() for p in model.parameters()]
    second = Engine(model, max_batch=2, max_seq_len=32)
    assert [p.data_ptr() for p in model.parameters()] == before  # nothing re-fused, nothing copied
    assert second.w.layers[2].wqkv.data_ptr() == first.w.layers[2].wqkv.data_ptr() == att.q_proj.weight.data_ptr()
    assert second.w.layers[2].w_gate_up.data_ptr() == mlp.gate_proj.weight.data_ptr()
    assert torch.equal(second.w.layers[2].wqkv, torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    assert torch.equal(second.w.layers[2].w_gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    for eng in (first, second, first):
        assert torch.equal(generate(model, rows, max_new_tokens=6, engine=eng).new_tokens, ref)
    assert torch.equal(generate(model, rows, max_new_tokens=6).new_tokens, ref)  # generate's cached engine too
    assert torch.equal(generate(model, rows, max_new_tokens=6, engine=first).new_tokens, ref)


def test_a_second_fusion_keeps_the_biases_of_qwen2(tmp_path):
    """q/k/v biases (Qwen2) are fused beside the weights; a second engine reuses both."""
    model = build_tiny_model("qwen2", seed=38, directory=str(tmp_path))
    rows = ragged_prompts(39, lengths=(4, 6))
    ref = generate(model, rows, max_new_tokens=5, engine="reference").new_tokens
    first = Engine(model, max_batch=2, max_seq_len=32)
    second = Engine(model, max_batch=2, max_seq_len=32)
    assert second.w.layers[0].bqkv is not None
    assert second.w.layers[0].bqkv.data_ptr() == first.w.layers[0].bqkv.data_ptr()
    for eng in (first, second):
        assert torch.equal(generate(model, rows, max_new_tokens=5, engine=eng).new_tokens, ref)


def test_training_mode_with_attention_dropout_is_refused(tmp_path):
    """HF applies attention dropout in training mode; the engine computes eval mode."""
    model = build_tiny_model("llama", seed=40, directory=str(tmp_path), attention_dropout=0.25)
    rows = ragged_prompts(41, lengths=(4, 6))
    want = generate(model, rows, max_new_tokens=4, engine="reference").new_tokens
    eng = Engine(model, max_batch=2, max_seq_len=32)
    model.train()
    with pytest.raises(ValueError, match=r"training mode with attention_dropout=0.25 \(call model.eval\(\)\)"):
        generate(model, rows, max_new_tokens=4, engine=eng)
    with pytest.raises(ValueError, match="training mode"):
        generate(model, rows, max_new_tokens=4)
    model.eval()
    assert torch.equal(generate(model, rows, max_new_tokens=4, engine=eng).new_tokens, want)
    plain = build_tiny_model("llama", seed=40, directory=str(tmp_path / "plain")).train()  # dropout 0: nothing changes
    assert fast_path_problems(plain) == []
