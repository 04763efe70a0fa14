"""The `svgt-fast` command line: generate (every artifact format, prompts files, chat template,
streaming, JSON), bench, train registration, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.cli import main
from svgt_fast.tiny import build_tiny_model, build_value_module, byte_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Llama, a tokenizer with a chat template, and one artifact of each method."""
    from svgt_fast import ConVAVectors, NeVANeurons, REControlValue
    from svgt_fast.conva import ConVAConfig
    from svgt_fast.neva import NeVAConfig
    from svgt_fast.re_control import REControlConfig

    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_model("llama", seed=5, directory=str(root / "model"), num_hidden_layers=6)
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "tok")
    d, L, I = model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size
    build_value_module(model, seed=5).save_pretrained(root / "svgt")
    g = torch.Generator().manual_seed(5)
    ConVAVectors(ConVAConfig(d, L, [0]), torch.randn(1, d, generator=g), torch.zeros(1),
                 torch.randn(1, d, generator=g), torch.zeros(1)).save_pretrained(root / "conva")
    NeVANeurons(NeVAConfig(d, I, L, [1], 4), torch.tensor([[0, 5, 9, 20]]), torch.ones(1, 4)).save_pretrained(
        root / "neva")
    REControlValue(REControlConfig(d, [8])).save_pretrained(root / "re_control")
    (root / "bad").mkdir()
    (root / "bad" / "config.json").write_text(json.dumps({"format": "someone.else", "format_version": 1}))
    return root, model


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_demo_runs_and_shows_both_continuations(capsys):
    """The demo runs the embedded world backbone + SVGT module; each continuation is judged by the
    world's rule, and the summary compares harmful rates (the efficacy itself is tested in
    tests/test_train_svgt.py)."""
    assert main(["demo", "--max-new-tokens", "12", "--rate-prompts", "16",
                 "--prompts", "<bos> how do i secretly revenge burn the school ? answer:"]) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "SVGT" in out and "prompt: '<bos> how do i secretly" in out
    assert out.count("[") >= 2 and ("HARMFUL]" in out or "ok]" in out)
    assert "harmful rate over 16 held-out risky prompts" in out
    assert "SVGT: policy sparse, threshold 0.5, refresh every 1 token(s)" in out  # the recommended setting
    assert main(["demo", "--max-new-tokens", "6", "--rate-prompts", "0", "--policy", "always",
                 "--refresh-interval", "5", "--prompts", "<bos> how do i"]) == 0
    assert "SVGT: policy always, refresh every 5 token(s)" in capsys.readouterr().out


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "svgt_fast.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("generate", "bench", "demo", "convert", "train"):
        assert cmd in res.stdout
    res = subprocess.run([sys.executable, "-m", "svgt_fast.cli", "generate", "--help"], capture_output=True, text=True)
    for opt in ("--value-module", "--prompts-file", "--chat-template", "--stream", "--json", "--refresh-interval",
                "--policy", "--beta", "--strength", "--top-p", "--top-k", "--seed", "--dtype", "--device"):
        assert opt in res.stdout


def test_convert_error_is_reported_not_raised(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    rc = main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_generate_svgt_json_equals_the_api(files, capsys):
    root, model = files
    rc, out, err = _run(capsys, "generate", root / "model", "How do I", "--tokenizer", "bytes", "a b",
                        "--value-module", root / "svgt", "--refresh-interval", "2", "--refresh", "bridge",
                        "--beta", "0.7", "--strength", "0.5", "--max-new-tokens", "6", "--json", "--dtype", "float32")
    assert rc == 0, err
    res = json.loads(out)
    from svgt_fast import SVGTModule

    st = SVGT(SVGTModule.from_pretrained(root / "svgt"), refresh_interval=2, refresh="bridge", beta=0.7,
              gradient_step_size=0.5)
    want = generate(model, ["How do I", "a b"], tokenizer=byte_tokenizer(), steering=st, max_new_tokens=6)
    assert [o["text"] for o in res["outputs"]] == want.texts
    assert [o["tokens"] for o in res["outputs"]] == [want.new_tokens[i, : int(want.num_new_tokens[i])].tolist()
                                                     for i in range(2)]
    assert [o["trigger_count"] for o in res["outputs"]] == want.trigger_counts.tolist()
    assert [o["finish_reason"] for o in res["outputs"]] == want.finish_reasons
    assert {"prefill_s", "decode_s", "refresh_s", "total_s", "tokens"} <= set(res["timings"])


@pytest.mark.parametrize("method,opts", [("conva", ["--strength", "0.8"]), ("neva", ["--strength", "2"]),
                                         ("re_control", ["--n-steps", "2", "--strength", "0.1"])])
def test_generate_reads_every_artifact_format(files, capsys, method, opts):
    root, _ = files
    rc, out, err = _run(capsys, "generate", root / "model", "hi", "--tokenizer", "bytes", "--value-module",
                        root / method, "--max-new-tokens", "4", "--json", *opts)
    assert rc == 0, err
    assert json.loads(out)["outputs"][0]["num_new_tokens"] <= 4


def test_prompts_file_lines_and_jsonl_and_text_output(files, capsys, tmp_path):
    root, _ = files
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "first prompt"}\n{"prompt": "second", "id": 2}\n')
    outs = []
    for f in ("p.txt", "p.jsonl"):
        rc, out, err = _run(capsys, "generate", root / "model", "--prompts-file", tmp_path / f, "--tokenizer", "bytes",
                            "--max-new-tokens", "3", "--json", "--batch-size", "1")
        assert rc == 0, err
        outs.append(json.loads(out))
    assert outs[0]["outputs"] == outs[1]["outputs"] and len(outs[0]["outputs"]) == 2
    assert outs[0]["timings"]["calls"] == 2  # --batch-size 1: one call per prompt
    rc, out, err = _run(capsys, "generate", root / "model", "--tokenizer", "bytes", "x", "--max-new-tokens", "3")
    assert rc == 0 and "prompt: 'x'" in out and "tokens in" in err


def test_stream_prints_text_and_json_lines(files, capsys):
    root, model = files
    rc, out, _ = _run(capsys, "generate", root / "model", "abc", "--tokenizer", "bytes", "--max-new-tokens", "5",
                      "--stream")
    want = generate(model, "abc", tokenizer=byte_tokenizer(), max_new_tokens=5)
    assert rc == 0 and out == want.texts[0] + "\n"
    rc, out, _ = _run(capsys, "generate", root / "model", "abc", "de", "--tokenizer", "bytes", "--max-new-tokens",
                      "5", "--stream", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    steps, final = lines[:-1], lines[-1]
    assert rc == 0 and final["final"] and steps[-1]["end_of_batch"] and steps[-1]["tokens"] == []
    assert [line["step"] for line in steps] == list(range(len(steps)))
    for i in range(2):
        assert "".join(line["texts"][i] for line in steps) == final["outputs"][i]["text"]


def test_chat_template(files, capsys):
    root, model = files
    rc, out, _ = _run(capsys, "generate", root / "model", "hi", "--tokenizer", root / "tok", "--chat-template",
                      "--max-new-tokens", "4", "--json")
    assert rc == 0
    tok = byte_tokenizer()
    want = generate(model, [tok("<user>hi<assistant>", add_special_tokens=False)["input_ids"]], max_new_tokens=4)
    assert json.loads(out)["outputs"][0]["tokens"] == want.new_tokens[0, : int(want.num_new_tokens[0])].tolist()
    rc, _, err = _run(capsys, "generate", root / "model", "hi", "--tokenizer", "bytes", "--chat-template")
    assert rc == 2 and "no chat template" in err


@pytest.mark.parametrize("args,msg", [
    (["generate", "{root}/nope", "hi"], "no such directory"),
    (["generate", "{root}/model", "hi"], "holds no tokenizer"),
    (["generate", "{root}/model", "--tokenizer", "bytes"], "no prompts"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--value-module", "{root}/bad"],
     "unknown artifact format 'someone.else'"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--value-module", "{root}/missing"],
     "no such directory"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--value-module", "{root}/conva", "--refresh", "exact"],
     "--refresh do not apply to a conva artifact"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--strength", "2", "--refresh", "bridge"],
     "--refresh, --strength steer through an artifact: give --value-module DIR too"),  # not silently unsteered
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--value-module", "{root}/svgt", "--refresh", "fast"],
     "refresh must be one of"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--top-p", "0"], "top_p"),
    (["generate", "{root}/model", "hi", "--tokenizer", "bytes", "--max-new-tokens", "10000"], "context is 256"),
    (["generate", "{root}/model", "a", "b", "--tokenizer", "bytes", "--stream"], "add --json"),
    (["generate", "{root}/model", "hi", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "{root}/model", "--prompts-file", "{root}/absent.txt", "--tokenizer", "bytes"], "no such file"),
    (["bench", "llama3-8b", "--device", "cpu"], "GPU benchmark"),
    (["bench", "no-such-shape", "--device", "cpu"], "neither a model directory nor a named shape"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(files, capsys, args, msg):
    root, _ = files
    rc, _, err = _run(capsys, *[a.format(root=root) for a in args])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and msg in lines[0], err


def test_bad_jsonl_line_is_named(files, capsys, tmp_path):
    root, _ = files
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    rc, _, err = _run(capsys, "generate", root / "model", "--prompts-file", tmp_path / "p.jsonl", "--tokenizer", "bytes")
    assert rc == 2 and "p.jsonl:2: needs a string field \"prompt\"" in err


def test_bench_writes_json_and_records_telemetry(files, capsys, tmp_path):
    rc, out, err = _run(capsys, "bench", "tiny", "--batches", "1", "--prompt", "8", "--new-tokens", "4", "--modes",
                        "bridge", "--no-baselines", "--device", "cpu", "--out", tmp_path)
    assert rc == 0, err
    res = json.loads((tmp_path / "generate_tiny.json").read_text())
    env = res["environment"]
    if torch.cuda.is_available():
        assert "sm_clock_mhz" in env or env["gpu_telemetry"].startswith("absent")
    else:
        assert env["gpu_telemetry"] == "absent: no CUDA device"
    whats = [r["what"] for r in res["rows"]]
    assert whats == ["engine_unsteered"] * 2 + ["engine_svgt_bridge_k5_r5"] * 2
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 for r in res["rows"])
    assert "ms_median" in res["rows"][1] and "ms_per_token" in out and "CPU timings check the harness" in err


def test_train_is_registered_or_says_it_is_unavailable(capsys, monkeypatch):
    rc, out, err = _run(capsys, "train", "--help")
    assert rc == 0 and "usage: svgt-fast train" in out
    monkeypatch.setitem(sys.modules, "svgt_fast.train_cli", None)  # as if the module were missing
    rc, _, err = _run(capsys, "train")
    assert rc == 2 and "train is unavailable" in err


def test_gpu_telemetry_reads_the_device_torch_uses(monkeypatch):
    """The NVML path (never run without a GPU) against a stand-in NVML with two GPUs: torch's
    device 0 is the machine's GPU 1 (CUDA_VISIBLE_DEVICES=1), so the handle comes by UUID, not
    by index; without a UUID the index is used and the JSON says so."""
    import sys
    import types

    from svgt_fast import bench

    gpus = {"GPU-aaaa": dict(mem=10e9, clock=1980, power=350_000), "GPU-bbbb": dict(mem=20e9, clock=1755, power=700_000)}
    nvml = types.SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: gpus[u],
        nvmlDeviceGetHandleByIndex=lambda i: list(gpus.values())[i],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=h["mem"], total=80e9),
        nvmlDeviceGetClockInfo=lambda h, kind: h["clock"] if kind == 0 else 2619,
        nvmlDeviceGetPowerUsage=lambda h: h["power"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = types.SimpleNamespace(uuid="bbbb")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    t = bench.gpu_telemetry()
    assert t == {"gpu_telemetry": "nvml", "nvml_device_matched_by": "uuid", "sm_clock_mhz": 1755,
                 "mem_clock_mhz": 2619, "power_w": 700.0, "gpu_mem_used_gb": 20.0, "gpu_mem_total_gb": 80.0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace())  # no .uuid
    t = bench.gpu_telemetry()
    assert t["nvml_device_matched_by"] == "index" and t["sm_clock_mhz"] == 1980
    nvml.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("driver not loaded"))
    assert bench.gpu_telemetry()["gpu_telemetry"].startswith("absent: NVML error")
