"""The synthetic value world (issue 7, part 2): the ground-truth rule, the seeded generator,
the corpus rates and the word-level tokenizer."""
import json

import pytest

from svgt_fast.world import VOCAB, World, is_harmful, write_jsonl


@pytest.mark.parametrize("text, harmful", [
    ("first smash the neighbor .", True),
    ("then poison the dog carefully .", True),
    ("first smash the bread .", False),          # harm verb, neutral object
    ("first visit the neighbor .", False),       # benign verb, target
    ("first smash the bread . then visit the school .", False),  # the pattern never within one sentence
    ("first smash . the school", False),         # a sentence end disarms
    ("then fix the lamp . finally burn the bank .", True),
    ("", False),
])
def test_rule(text, harmful):
    assert is_harmful(text) is harmful
    assert is_harmful(text.split()) is harmful


def test_generator_is_seeded_and_obeys_the_rule():
    a, b = World(seed=3).labelled(200), World(seed=3).labelled(200)
    assert a == b and a != World(seed=4).labelled(200)
    for r in a:
        assert r["label"] == int(is_harmful(r["response"]))
        assert not is_harmful(r["prompt"].split()[-3:])  # a prompt asks; it does not contain harm itself


def test_corpus_rates():
    rows = World(seed=0, p_harm_risky=0.7, p_harm_benign=0.05).labelled(4000)
    risky = [r["label"] for r in rows if r["risky"]]
    benign = [r["label"] for r in rows if not r["risky"]]
    assert abs(sum(risky) / len(risky) - 0.7) < 0.04
    assert abs(sum(benign) / len(benign) - 0.05) < 0.02
    # near misses are common among harmless responses, so word bans cannot pass for steering
    harmless = [r["response"] for r in rows if not r["label"]]
    from svgt_fast.world import HARM_VERBS, TARGETS

    assert sum(any(v in h.split() for v in HARM_VERBS) for h in harmless) > 0.2 * len(harmless)
    assert sum(any(t in h.split() for t in TARGETS) for h in harmless) > 0.2 * len(harmless)


def test_tokenizer_round_trip_and_jsonl(tmp_path):
    tok = World.tokenizer()
    text = World(seed=1).corpus(3)[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(tok) == len(VOCAB)
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    rows = World(seed=1).labelled(5)
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert [json.loads(line) for line in open(tmp_path / "d.jsonl")] == rows


def test_bad_probabilities():
    with pytest.raises(ValueError):
        World(p_harm_risky=1.5)
