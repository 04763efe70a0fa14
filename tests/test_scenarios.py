"""Random whole calls (tests/scenarios.py): ragged batches mixing every steering kind, mode,
policy and trigger, sampling, EOS, graph emulation, chunked prefill and engine reuse — the fast
engine's tokens and trigger counts must equal the reference engine's. A fixed set of seeds runs
here; `python tests/scenarios.py N` runs more when hunting bugs."""
import pytest

from scenarios import check_scenario, random_scenario, tiny_family_models, variant_models

SEEDS = range(1000, 1012)


@pytest.fixture(scope="module")
def models7():
    return tiny_family_models()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_call_equals_reference(models7, seed):
    sc = random_scenario(seed)
    problems = check_scenario(models7, sc)
    assert not problems, sc.describe() + "\n" + "\n".join(problems)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [2000, 2001])
def test_random_call_triton_backend_equals_reference(models7, seed):
    sc = random_scenario(seed)
    sc.engine["attention"] = "triton"
    problems = check_scenario(models7, sc)
    assert not problems, sc.describe() + "\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def variant_models7():
    return variant_models()


@pytest.mark.parametrize("seed", [3000, 3001, 3005, 3006, 3008])
def test_random_call_on_a_config_variant_equals_reference(variant_models7, seed):
    """The same random calls on the models real checkpoints look like: biases, tied embeddings,
    MQA / MHA, head_dim != hidden / heads, scaled RoPE (scenarios.VARIANTS)."""
    sc = random_scenario(seed, variants=True)
    assert sc.variant is not None
    problems = check_scenario(variant_models7, sc)
    assert not problems, sc.describe() + "\n" + "\n".join(problems)
