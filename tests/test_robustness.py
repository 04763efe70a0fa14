"""Robustness of the public entries: bad Engine arguments and requests, inputs on the wrong
device, out-of-memory turned into advice, two threads sharing one Engine, and artifacts that
never execute code when loaded."""
import os
import pickle
import threading
import time

import pytest
import torch

from svgt_fast import SVGT, ConVA, ConVAVectors, NeVA, REControl, Engine, NeVANeurons, REControlValue, SVGTModule, generate
from svgt_fast.sampling import SamplingParams
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import FakeCudaDevice, ragged_prompts, random_artifact


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


# ---- Engine arguments and requests -------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,msg", [
    (dict(max_batch=0), ValueError, "max_batch must be >= 1"),
    (dict(max_batch=2.5), TypeError, "max_batch must be an int"),
    (dict(max_batch="8"), TypeError, "max_batch must be an int"),
    (dict(max_seq_len=1), ValueError, "max_seq_len must be >= 2"),
    (dict(max_seq_len=10_000), ValueError, "exceeds the model's context of 256"),
    (dict(max_bridge_tokens=17), ValueError, "max_bridge_tokens must be in 1..16"),
    (dict(prefill_tokens=0), ValueError, "prefill_tokens"),
    (dict(cuda_graphs="yes"), TypeError, "cuda_graphs"),
    (dict(dtype="bfloat16"), TypeError, "torch.dtype"),
    (dict(dtype=torch.float16), ValueError, "differs from the model"),
    (dict(attention="flash3"), ValueError, "attention must be one of"),
])
def test_engine_arguments(llama, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        Engine(llama, **kw)


def test_triton_on_cpu_without_interpreter_is_refused(llama, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(llama, max_batch=1, max_seq_len=8, attention="triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("triton_v, numpy_v, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.9.0", "2.4.6", False)])
def test_triton_interpreter_with_numpy_it_cannot_run(llama, monkeypatch, triton_v, numpy_v, refused):
    """Triton < 3.7's interpreter fails every looped kernel under NumPy >= 2.4 (found running the
    suite with the GPU machine's triton 3.6): the engine says so instead of an obscure TypeError."""
    import numpy
    import triton

    from svgt_fast.kernels import interpreter_problem

    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(numpy, "__version__", numpy_v)
    assert (interpreter_problem() is not None) == refused
    if refused:
        with pytest.raises(RuntimeError, match=f"Triton {triton_v}'s CPU interpreter .* NumPy {numpy_v}"):
            Engine(llama, max_batch=1, max_seq_len=8, attention="triton")


@pytest.mark.interpreter
def test_triton_interpreter_bf16_engine_is_refused():
    """bf16 tl.dot gives garbage in Triton's interpreter: an engine that would run it refuses."""
    model = build_tiny_model("llama", seed=3).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 matrix products"):
        Engine(model, max_batch=1, max_seq_len=8, attention="triton")
    Engine(model, max_batch=1, max_seq_len=8, attention="torch")  # the CPU path is fine


def test_model_split_or_meta_is_refused():
    model = build_tiny_model("llama", seed=3)
    model.lm_head.to("meta")
    with pytest.raises(ValueError, match="span several devices"):
        Engine(model, max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="span several devices"):
        generate(model, [[1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="meta device"):
        Engine(model.to("meta"), max_batch=1, max_seq_len=8)


def test_engine_request_checks(llama):
    eng = Engine(llama, max_batch=2, max_seq_len=16)
    kw = dict(steering=None, sampling=SamplingParams(), row_seeds=torch.arange(1), eos_ids=frozenset(), pad_id=0)
    bad = [
        (dict(prompts=[]), ValueError, "non-empty list"),
        (dict(prompts=[[1, 2]]), TypeError, "prompt 0 must be a tensor"),
        (dict(prompts=[torch.tensor([[1, 2]])]), ValueError, "1-D"),
        (dict(prompts=[torch.tensor([], dtype=torch.long)]), ValueError, "non-empty 1-D"),
        (dict(prompts=[torch.tensor([1.0, 2.0])]), ValueError, "int64 or int32"),
        (dict(prompts=[torch.tensor([1, 999])]), ValueError, "vocabulary"),
        (dict(prompts=[torch.tensor([1, 2], device="meta")]), ValueError, "is on meta"),
        (dict(prompts=[torch.tensor([1, 2])], max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(prompts=[torch.tensor([1, 2])], max_new_tokens=15), ValueError, "max_seq_len=16"),
        (dict(prompts=[torch.tensor([1])] * 3, row_seeds=torch.arange(3)), ValueError, "max_batch=2"),
        (dict(prompts=[torch.tensor([1, 2])], row_seeds=torch.arange(2)), ValueError, "row_seeds"),
        (dict(prompts=[torch.tensor([1, 2])], forced_tokens=torch.zeros(1, 2, dtype=torch.long)), ValueError,
         "forced_tokens"),
        # a negative forced id wrapped around the embedding; a float one indexed nothing
        *[(dict(prompts=[torch.tensor([1, 2])], forced_tokens=f), ValueError, r"integer ids in \[0, 257\)")
          for f in (torch.tensor([[1, -1, 2, 3]]), torch.tensor([[1, 257, 2, 3]]), torch.zeros(1, 4))],
    ]
    for over, exc, msg in bad:
        args = dict(kw, max_new_tokens=4)
        args.update(over)
        with pytest.raises(exc, match=msg):
            eng.generate(**args)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda m: generate(m, torch.tensor([[1, 2]], device="meta"), max_new_tokens=2), ValueError, "is on meta"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, device="meta", dtype=torch.long),
                        max_new_tokens=2), ValueError, "attention_mask is on meta"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2), max_new_tokens=2),
     ValueError, "0/1 as integers"),
    (lambda m: generate(m, torch.tensor([[1, 2]]), attention_mask=[[1, 1]], max_new_tokens=2), TypeError,
     "attention_mask must be a tensor"),
    (lambda m: generate(m, [[1, 2.5]], max_new_tokens=2), TypeError, "token ids must be ints"),
    (lambda m: generate(m, [[1, 2], 3], max_new_tokens=2), TypeError, "mixes token lists"),
    (lambda m: generate(m, [], max_new_tokens=2), ValueError, "no prompts"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, temperature="hot", seed=0), TypeError, "temperature"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, top_k=2.0), TypeError, "top_k"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, temperature=0.5, seed=1.5), TypeError, "seed"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, eos_token_id="eos"), TypeError, "eos_token_id"),
    # an eos id outside the vocabulary can never be sampled: the rows would silently never stop
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, eos_token_id=10**6), ValueError,
     r"eos_token_id \[1000000\] lies outside the vocabulary \[0, 257\)"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, eos_token_id=[256, -1]), ValueError, r"eos_token_id \[-1\] lies"),
    # 1 / 1e-300 overflowed float32: softmax NaN, every token id 0 (both engines)
    *[(lambda m, e=e: generate(m, [[1, 2]], max_new_tokens=2, temperature=1e-300, seed=0, engine=e), ValueError,
       "temperature 1e-300 is below 1e-06") for e in ("fast", "reference")],
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, temperature=float("inf"), seed=0), ValueError,
     "temperature must be >= 0 and finite"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, tokenizer=object()), TypeError, "tokenizer must be a Hugging Face"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, steering=[None, None]), ValueError, "2 entries"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=2, engine=["fast"]), ValueError, "engine must be"),
])
def test_generate_bad_input(llama, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(llama)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kind,kw,exc,msg", [
    ("svgt", dict(refresh_interval=True), TypeError, "refresh_interval must be an int, got bool"),
    ("svgt", dict(refresh_interval=2.5), TypeError, "refresh_interval must be an int"),
    ("svgt", dict(refresh_interval=0), ValueError, "refresh_interval must be >= 1"),
    ("svgt", dict(beta="0.5"), TypeError, "beta must be a number, got str"),
    ("svgt", dict(beta=NAN), ValueError, r"beta must lie in \[0, 1\]"),
    ("svgt", dict(gradient_step_size=INF), ValueError, "gradient_step_size must be >= 0 and finite"),
    ("svgt", dict(score_threshold=NAN), ValueError, "score_threshold must be a number"),
    ("svgt", dict(drift_threshold="x"), TypeError, "drift_threshold .* must be a number"),
    ("svgt", dict(drift_threshold=2.5), ValueError, r"drift_threshold .* must lie in \[0, 2\]"),
    ("conva", dict(p0="high"), TypeError, "p0 must be a number"),
    ("conva", dict(g0=1.0), ValueError, r"g0 must lie in \(0, 1\)"),
    ("neva", dict(strength="1"), TypeError, "strength must be a number"),
    ("neva", dict(strength=INF), ValueError, "strength must be finite"),
    ("re_control", dict(n_steps=True), TypeError, "n_steps must be an int, got bool"),
    ("re_control", dict(step_size=-1.0), ValueError, "step_size must be >= 0"),
    ("re_control", dict(step_size=INF), ValueError, "step_size must be >= 0 and finite"),
])
def test_steering_options_are_checked(kind, kw, exc, msg):
    """A steering option of the wrong type or out of range is refused where it is written, not
    turned into NaN tokens or a TypeError from deep inside the engine (an infinite
    gradient_step_size once gave NaN logits, a string strength passed until the first step)."""
    model = build_tiny_model("llama", seed=5, num_hidden_layers=7)  # ConVA never steers the last 5 layers
    if kind == "svgt":
        make = lambda **o: SVGT(build_value_module(model, seed=5), **o)  # noqa: E731
    else:
        ctor = dict(conva=ConVA, neva=NeVA, re_control=REControl)[kind]
        make = lambda **o: ctor(random_artifact(model, kind, seed=5), **o)  # noqa: E731
    with pytest.raises(exc, match=msg):
        make(**kw)


def test_steering_options_take_numpy_numbers_and_infinite_thresholds(llama):
    import numpy as np

    vm = build_value_module(llama, seed=6)
    a = generate(llama, [[3, 4, 5]], max_new_tokens=5, steering=SVGT(
        vm, refresh_interval=np.int64(2), beta=np.float32(0.5), gradient_step_size=np.float64(1.0)))
    b = generate(llama, [[3, 4, 5]], max_new_tokens=5, steering=SVGT(vm, refresh_interval=2, beta=0.5,
                                                                     gradient_step_size=1.0))
    assert torch.equal(a.new_tokens, b.new_tokens)
    # an infinite score threshold is a rule, not an error: never fire (sparse) = unsteered
    never = SVGT(vm, policy="sparse", score_threshold=INF)
    out = generate(llama, [[3, 4, 5]], max_new_tokens=5, steering=never)
    assert torch.equal(out.new_tokens, generate(llama, [[3, 4, 5]], max_new_tokens=5).new_tokens)
    assert int(out.trigger_counts[0]) == 0
    NeVA(random_artifact(llama, "neva", seed=6), strength=-1.0)  # a negative strength steers away


def test_cpu_inputs_are_accepted_and_numpy_ints_work(llama):
    import numpy as np

    a = generate(llama, torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    b = generate(llama, [[5, 6, 7]], max_new_tokens=np.int64(3), top_k=np.int64(0), temperature=np.float32(0.0))
    assert torch.equal(a.new_tokens, b.new_tokens)


# ---- out of memory -----------------------------------------------------------------------------
def test_oom_at_engine_construction_gives_advice(llama, monkeypatch):
    real = torch.zeros

    def zeros(*shape, **kw):
        if len(shape) == 5:  # the KV cache [L, B, Hkv, S + 1, D]
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(MemoryError, match=r"KV cache for max_batch=64, max_seq_len=256 \(.* GiB\).*lower max_batch "
                                          r"or max_seq_len"):
        Engine(llama, max_batch=64, max_seq_len=256)


def test_oom_during_capture_or_generation_gives_advice_and_frees_the_engine(llama, monkeypatch):
    eng = Engine(llama, max_batch=2, max_seq_len=32)
    want = generate(llama, [[1, 2, 3]], max_new_tokens=4, engine=eng)

    def runner(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(eng, "_decode_runner", runner)
    with pytest.raises(MemoryError, match=r"out of device memory during generation \(CUDA out of memory.*"
                                          r"max_batch \(2\), max_seq_len \(32\).*cuda_graphs=False"):
        generate(llama, [[1, 2, 3]], max_new_tokens=4, engine=eng)
    monkeypatch.undo()
    assert not eng.guard.busy
    assert torch.equal(generate(llama, [[1, 2, 3]], max_new_tokens=4, engine=eng).new_tokens, want.new_tokens)


# ---- threads -----------------------------------------------------------------------------------
def test_two_threads_sharing_one_engine_are_serialised(llama):
    """Each thread gets the tokens it gets alone; the engine never runs two calls at once."""
    eng = Engine(llama, max_batch=3, max_seq_len=48)
    module = build_value_module(llama, seed=90)
    jobs = [(ragged_prompts(90 + i, lengths=(3 + i, 5)), SVGT(module, refresh_interval=2) if i % 2 else None)
            for i in range(4)]
    want = [generate(llama, rows, steering=st, max_new_tokens=6, engine=eng).new_tokens for rows, st in jobs]
    active, peak = [0], [0]
    prefill = eng._prefill

    def slow_prefill(*a, **kw):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.02)  # widen the window in which a second call could slip in
        try:
            return prefill(*a, **kw)
        finally:
            active[0] -= 1

    eng._prefill = slow_prefill
    got, errors = {}, []
    start = threading.Barrier(2)

    def worker(w):
        try:
            start.wait()
            for rep in range(3):
                for j in range(w, len(jobs), 2):
                    rows, st = jobs[j]
                    if rep == 1:  # streamed calls take the same lock
                        out = [e for e in generate(llama, rows, steering=st, max_new_tokens=6, engine=eng,
                                                   stream=True)][-1].output
                    else:
                        out = generate(llama, rows, steering=st, max_new_tokens=6, engine=eng)
                    got[(j, rep)] = out.new_tokens
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert peak[0] == 1
    assert len(got) == 3 * len(jobs)
    for (j, _), toks in got.items():
        assert torch.equal(toks, want[j])


def test_a_thread_waits_for_another_threads_open_stream(llama):
    eng = Engine(llama, max_batch=1, max_seq_len=32)
    stream = generate(llama, [[1, 2, 3]], max_new_tokens=6, engine=eng, stream=True)
    next(stream)  # holds the engine
    done = threading.Event()
    result = []
    t = threading.Thread(target=lambda: (result.append(generate(llama, [[4, 5]], max_new_tokens=3, engine=eng)),
                                         done.set()))
    t.start()
    assert not done.wait(0.5)  # blocked behind the stream, not refused, not interleaved
    list(stream)
    t.join(timeout=120)
    assert done.is_set() and result[0].new_tokens.shape == (1, 3)


def test_reference_engine_calls_on_one_model_do_not_interleave(llama, monkeypatch):
    import svgt_fast.reference as reference

    active, peak = [0], [0]
    real = reference.generate_row

    def tracked(*a, **kw):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        try:
            return real(*a, **kw)
        finally:
            active[0] -= 1

    monkeypatch.setattr(reference, "generate_row", tracked)
    threads = [threading.Thread(target=generate, args=(llama, [[1, 2], [3]]),
                                kwargs=dict(max_new_tokens=2, engine="reference")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert peak[0] == 1


# ---- the engine's device is current while it works -------------------------------------------
def test_each_step_of_a_call_runs_with_the_engines_device_current(monkeypatch):
    """Triton launches on the current device and a capture records the current device's stream,
    so a model on cuda:1 with cuda:0 current must have cuda:1 current inside every step of a call,
    including a stream's steps and its close, and only there: the consumer's device is its own
    between steps. (The same on two real GPUs: test_gpu.test_engine_on_a_second_gpu.)"""
    from svgt_fast.guard import CallGuard

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    FakeCudaDevice.current[0] = 0
    seen = []

    def call():
        try:
            for t in range(3):
                seen.append(("step", t, FakeCudaDevice.current[0]))
                yield t
            return "result"
        finally:
            seen.append(("cleanup", FakeCudaDevice.current[0]))

    guard = CallGuard("Engine")
    stream = guard.run(call(), device=torch.device("cuda", 1))
    for t in stream:
        seen.append(("consumer", t, FakeCudaDevice.current[0]))
    assert seen == [("step", 0, 1), ("consumer", 0, 0), ("step", 1, 1), ("consumer", 1, 0), ("step", 2, 1),
                    ("consumer", 2, 0), ("cleanup", 1)]
    assert not guard.busy

    seen.clear()  # a stream closed after its first step: the call's cleanup on its device, the lock freed
    stream = guard.run(call(), device=torch.device("cuda", 1))
    assert next(stream) == 0
    stream.close()
    assert seen == [("step", 0, 1), ("cleanup", 1)] and FakeCudaDevice.current[0] == 0 and not guard.busy

    seen.clear()  # the return value comes through; a CPU engine changes nothing
    from svgt_fast.streaming import run_to_end

    assert run_to_end(guard.run(call(), device=torch.device("cuda", 1))) == "result"
    assert run_to_end(guard.run(call(), device=torch.device("cpu"))) == "result"
    assert [s[-1] for s in seen] == [1, 1, 1, 1, 0, 0, 0, 0]


# ---- artifacts never execute code --------------------------------------------------------------
class _Boom:
    """Unpickling this runs code (it would create a marker file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _artifacts(model, root):
    from svgt_fast.conva import ConVAConfig
    from svgt_fast.neva import NeVAConfig
    from svgt_fast.re_control import REControlConfig

    d, L, I = model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size
    build_value_module(model, seed=1).save_pretrained(root / "svgt")
    ConVAVectors(ConVAConfig(d, 8, [0]), torch.randn(1, d), torch.zeros(1), torch.randn(1, d),
                 torch.zeros(1)).save_pretrained(root / "conva")
    NeVANeurons(NeVAConfig(d, I, L, [1], 2), torch.tensor([[0, 5]]), torch.ones(1, 2)).save_pretrained(root / "neva")
    REControlValue(REControlConfig(d, [8])).save_pretrained(root / "re_control")
    return {"svgt": SVGTModule, "conva": ConVAVectors, "neva": NeVANeurons, "re_control": REControlValue}


def test_artifacts_load_without_unpickling(llama, tmp_path, monkeypatch):
    classes = _artifacts(llama, tmp_path)
    marker = tmp_path / "code_ran"

    def no_pickle(*a, **kw):
        raise AssertionError("an artifact loader unpickled something")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    for name, cls in classes.items():
        cls.from_pretrained(tmp_path / name)  # valid: loads through safetensors only
        # a pickle behind the weights file's name is refused, and its code never runs
        with open(tmp_path / name / "model.safetensors", "wb") as f:
            f.write(pickle.dumps(_Boom(str(marker))))
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            cls.from_pretrained(tmp_path / name)
    assert not marker.exists()


def test_converter_never_runs_pickled_code(llama, tmp_path):
    from svgt_fast import SVGTConfig, convert_reference_checkpoint

    marker = tmp_path / "code_ran"
    for stage in ("s2.pt", "s3.pt"):
        torch.save({"model_state_dict": _Boom(str(marker))}, tmp_path / stage)
    config = SVGTConfig.for_backbone(llama.config).to_dict()
    with pytest.raises(ValueError, match="weights-only"):
        convert_reference_checkpoint(tmp_path / "s2.pt", tmp_path / "s3.pt", config, tmp_path / "o")
    assert not marker.exists() and not os.path.exists(tmp_path / "o")


def _edit_config(path, edit):
    import json

    with open(path / "config.json") as f:
        meta = json.load(f)
    meta = edit(meta)
    with open(path / "config.json", "w") as f:
        json.dump(meta, f)


def _set(key, value):
    def edit(meta):
        meta["config"][key] = value
        return meta
    return edit


def _drop(key):
    def edit(meta):
        del meta["config"][key]
        return meta
    return edit


@pytest.mark.parametrize("kind,edit,msg", [
    *[(k, lambda meta: [], 'expected a JSON object with a "config" object') for k in ("svgt", "conva", "neva", "re_control")],
    *[(k, lambda meta: {"format": meta["format"], "format_version": 1}, 'with a "config" object')
      for k in ("svgt", "neva")],
    # a field left out is not quietly given its default: n_heads splits the same weights otherwise
    ("svgt", _drop("n_heads"), r"SVGTConfig missing fields \['n_heads'\]"),
    ("svgt", _drop("layer_norm_eps"), "missing fields"),
    ("svgt", _set("n_heads", "4"), "SVGTConfig: n_heads must be an int, got str"),
    ("svgt", _set("attention_pooling", 0), "attention_pooling must be true or false"),
    ("svgt", _set("layer_norm_eps", None), "layer_norm_eps must be a number"),
    ("svgt", _set("n_heads", 0), "n_heads and vlp_n_heads must be >= 1"),
    ("svgt", _set("generator", "transformer"), "generator must be one of"),
    ("svgt", _set("extra", 1), r"unknown fields \['extra'\]"),
    # sizes that do not fit the weights are found before anything is allocated
    ("svgt", _set("hidden_size", 10**6), "does not match the SVGT module config"),
    ("svgt", _set("hidden_size", 10**9), "sizes that cannot be built"),
    ("conva", _drop("gate_accuracies"), "ConVAConfig missing fields"),
    ("conva", _set("accuracies", [1.5]), r"accuracies\[0\] must lie in \[0, 1\]"),
    ("conva", _set("layers", "0"), "layers must be a list"),
    ("neva", _set("top_k", True), "top_k must be an int, got bool"),
    ("neva", _set("scores", [-1.0]), r"scores\[0\] .* must be >= 0"),
    ("re_control", _set("hidden_dims", "8"), "hidden_dims must be a list"),
    ("re_control", _set("hidden_dims", [10**9]), "does not match the RE-Control value function config"),
    ("re_control", _drop("activation"), "missing fields"),
])
def test_corrupt_artifact_configs_are_refused_naming_the_file(llama, tmp_path, kind, edit, msg):
    """A config.json that is not what save_pretrained wrote (hand-edited, truncated, from another
    tool) is a ValueError naming the file and the field (the weights file when the sizes disagree
    with it), never a KeyError, an AttributeError, an
    out-of-memory or a module quietly built with a default."""
    classes = _artifacts(llama, tmp_path)
    _edit_config(tmp_path / kind, edit)
    with pytest.raises(ValueError, match=msg) as info:
        classes[kind].from_pretrained(tmp_path / kind)
    named = "model.safetensors" if "does not match" in msg else "config.json"  # the file that disagrees
    assert str(tmp_path / kind / named) in str(info.value)


def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in edit(state).items()}, path / "model.safetensors")


def _retensor(name, fn):
    def edit(state):
        key = name if name in state else sorted(state)[0]
        return {**state, key: fn(state[key])}
    return edit


_NAN = lambda t: torch.full_like(t, float("nan"))


@pytest.mark.parametrize("kind,edit,msg", [
    # a diverged or corrupt file: NaN weights gave every logit NaN and every token id 0, silently
    *[(k, _retensor("", _NAN), "non-finite values") for k in ("svgt", "conva", "re_control")],
    ("neva", _retensor("delta", _NAN), r"tensor delta holds 2 non-finite values"),
    ("svgt", _retensor("generator.gate_alpha", lambda t: t.clone().fill_(float("inf"))), "generator.gate_alpha holds 1 non-finite"),
    # integer or bool weights are a wrong file, not something to cast (RE-Control raised torch's own RuntimeError)
    *[(k, _retensor("", lambda t: t.to(torch.int32)), "is torch.int32, the .* needs a floating-point tensor")
      for k in ("svgt", "conva", "re_control")],
    ("svgt", _retensor("", lambda t: t.bool()), "is torch.bool, the SVGT module config needs a floating-point"),
    ("neva", _retensor("delta", lambda t: t.to(torch.int64)), "tensor delta is torch.int64"),
    # NeVA neuron ids: integers (a float id was truncated), each once per layer
    ("neva", _retensor("idx", lambda t: t.float() + 0.5), "tensor idx is torch.float32, the NeVA config needs an integer"),
    ("neva", _retensor("idx", lambda t: t.bool()), "tensor idx is torch.bool"),
    ("neva", _retensor("idx", lambda t: torch.zeros_like(t)), r"a neuron id repeats within layer\(s\) \[1\]"),
    ("neva", _retensor("idx", lambda t: t + 10**6), "neuron ids outside"),
    # a zero ConVA probe has no direction: v = w / |w| was NaN
    ("conva", _retensor("w", torch.zeros_like), r"probe rows \[0\] of w are zero"),
    # the shared key / shape check (SVGT and RE-Control had two of their own)
    ("re_control", lambda s: {**s, "extra": torch.zeros(1)}, r"unexpected keys \['extra'\]"),
    ("re_control", lambda s: {k: v for k, v in s.items() if k != "layers.1.bias"}, r"missing keys \['layers.1.bias'\]"),
    ("conva", lambda s: {**s, "b": torch.zeros(())}, r"shape mismatch b: \(\) vs expected \(1,\)"),
    ("neva", lambda s: {"idx": s["idx"]}, r"missing keys \['delta'\]"),
])
def test_corrupt_artifact_tensors_are_refused_naming_the_file(llama, tmp_path, kind, edit, msg):
    """Weights that cannot be what save_pretrained wrote (NaN, integers for floats, floats for
    neuron ids, repeated ids, a zero probe, a wrong name or shape) are a ValueError naming the
    weights file, before any generate call could turn them into silent garbage."""
    classes = _artifacts(llama, tmp_path)
    _edit_weights(tmp_path / kind, edit)
    with pytest.raises(ValueError, match=msg) as info:
        classes[kind].from_pretrained(tmp_path / kind)
    assert str(tmp_path / kind / "model.safetensors") in str(info.value)


def test_artifact_constructors_check_their_tensors(llama):
    """Built in code (a fit, a notebook), the artifacts go through the same tensor check."""
    from svgt_fast.conva import ConVAConfig
    from svgt_fast.neva import NeVAConfig

    d, I, L = llama.config.hidden_size, llama.config.intermediate_size, llama.config.num_hidden_layers
    cfg = ConVAConfig(d, L + 5, [0])
    with pytest.raises(ValueError, match="ConVA vectors: tensor w is torch.int64"):
        ConVAVectors(cfg, torch.ones(1, d, dtype=torch.long), torch.zeros(1), torch.zeros(1, d), torch.zeros(1))
    with pytest.raises(TypeError, match="ConVA vectors: b must be a torch.Tensor, got list"):
        ConVAVectors(cfg, torch.ones(1, d), [0.0], torch.zeros(1, d), torch.zeros(1))
    with pytest.raises(ValueError, match="NeVA neurons: a neuron id repeats"):
        NeVANeurons(NeVAConfig(d, I, L, [1, 2], 2), torch.tensor([[0, 5], [3, 3]]), torch.ones(2, 2))
    NeVANeurons(NeVAConfig(d, I, L, [1, 2], 2), torch.tensor([[0, 5], [3, 5]], dtype=torch.int32), torch.ones(2, 2))


@pytest.mark.parametrize("kind", ["svgt", "re_control"])
def test_mixed_dtype_artifact_loads_without_loss(llama, tmp_path, kind):
    """A file whose tensors mix dtypes (one fp16 tensor among fp32 ones; fp16 with bf16) loads in
    their promotion, every value exact: before, the module took the first tensor's dtype, so
    one fp16 tensor rounded all the others to fp16."""
    from safetensors.torch import load_file

    classes = _artifacts(llama, tmp_path)
    names = sorted(load_file(tmp_path / kind / "model.safetensors"))
    for first, rest, want in ((torch.float16, torch.float32, torch.float32), (torch.bfloat16, torch.float16, torch.float32),
                              (torch.bfloat16, torch.bfloat16, torch.bfloat16)):
        _edit_weights(tmp_path / kind, lambda s: {k: v.to(first if k == names[0] else rest) for k, v in s.items()})
        stored = load_file(tmp_path / kind / "model.safetensors")
        module = classes[kind].from_pretrained(tmp_path / kind)
        got = module.state_dict()
        assert {t.dtype for t in got.values()} == {want}
        for k, v in stored.items():
            assert torch.equal(got[k], v.to(want)), k


def test_neva_artifact_for_another_family_is_refused(llama, tmp_path):
    """NeVA's fit check compares the model type too, as the other three artifacts' do."""
    classes = _artifacts(llama, tmp_path)
    _edit_config(tmp_path / "neva", _set("backbone_model_type", "qwen2"))
    neurons = classes["neva"].from_pretrained(tmp_path / "neva")
    with pytest.raises(ValueError, match="built for model_type 'qwen2', backbone is 'llama'"):
        neurons.check_backbone(llama)
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        generate(llama, [[1, 2]], max_new_tokens=2, steering=NeVA(neurons))


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_backbone_with_nan_weights_stops_every_row_with_a_warning(engine):
    """A backbone whose weights hold NaN (a diverged checkpoint: its file is the user's, not
    checked at load) gives NaN logits. Every row stops at its first step, finish reason
    "nonfinite", 0 tokens, with a RuntimeWarning; before, every token came out as id 0."""
    model = build_tiny_model("llama", seed=31)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"row 0 after 0 tokens, row 1 after 0 tokens"):
        out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, engine=engine, pad_token_id=7)
    assert out.finish_reasons == ["nonfinite", "nonfinite"]
    assert out.num_new_tokens.tolist() == [0, 0] and out.new_tokens.shape == (2, 0)


@pytest.mark.parametrize("pad", [-100, 10**6])
def test_pad_id_outside_the_vocabulary_is_only_an_output_value(llama, pad):
    """pad_token_id fills a row's output after its EOS; it is never fed to the model, so a
    sentinel outside the vocabulary (-100, or past it) works on both engines, graphs included.
    Before, the fast engine fed pad to the embedding for finished rows: IndexError for 10**6
    (a device-side assert on a GPU) and the embedding's last row for -100 (index wrap-around)."""
    rows = ragged_prompts(23, lengths=(5, 2, 3))
    free = generate(llama, rows, max_new_tokens=6, eos_token_id=[])
    eos = int(free.new_tokens[0, 1])  # row 0 stops at its second token
    kw = dict(max_new_tokens=6, eos_token_id=[eos], pad_token_id=pad)
    ref = generate(llama, rows, engine="reference", **kw)
    eng = Engine(llama, max_batch=3, max_seq_len=16)
    for graphs in (False, True):
        eng.graph_emulation = graphs
        fast = generate(llama, rows, engine=eng, **kw)
        assert torch.equal(fast.new_tokens, ref.new_tokens) and torch.equal(fast.sequences, ref.sequences)
    n = int(ref.num_new_tokens[0])
    assert n == 2 and ref.finish_reasons[0] == "stop" and ref.new_tokens[0, n:].tolist() == [pad] * 4
    for i in range(3):  # the rows that did not stop are the unstopped call's, whatever the pad
        n = int(ref.num_new_tokens[i])
        assert torch.equal(ref.new_tokens[i, :n], free.new_tokens[i, :n])
