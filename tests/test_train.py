"""Issue 7 groundwork: the backbone trainer on the synthetic value world runs, learns the
grammar (loss far below uniform, generations made of the world's sentences), and its output
loads back with the real HF loading code. The risky -> harmful behaviour needs a longer run; it
is measured by the efficacy benchmark, not asserted here (a short run does not show it)."""
from svgt_fast import generate
from svgt_fast.train import train_backbone
from svgt_fast.world import VOCAB, World


def test_backbone_trainer(tmp_path):
    import math

    world = World(seed=0, p_harm_risky=0.9, p_harm_benign=0.0)
    _, _, loss = train_backbone(world, steps=150, batch_size=16, n_texts=2000, progress=False, out_dir=tmp_path / "bb",
                                hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    assert loss < 0.6 * math.log(len(VOCAB))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bb")
    tok = AutoTokenizer.from_pretrained(tmp_path / "bb")
    prompts = world.held_out_prompts(16, risky=True)
    out = generate(model, prompts, tokenizer=tok, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    for text in out.texts:
        words = text.split()
        assert "." in words and "<unk>" not in words, text  # whole sentences of the world's grammar
