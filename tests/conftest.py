import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter (must be set before triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from svgt_fast.kernels import interpreter_problem

    if os.environ["TRITON_INTERPRET"] == "1" and (_problem := interpreter_problem()) is not None:
        raise pytest.UsageError(_problem)  # one clear line instead of dozens of kernel test failures
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

from svgt_fast.tiny import build_tiny_model  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreter` run Triton kernels on CPU tensors, which only Triton's
    interpreter can do (CPU machines, where this file sets TRITON_INTERPRET=1). Where Triton
    compiles for a GPU they cannot run; their GPU twins are tests/test_gpu.py and the CUDA cases
    of the kernel tests."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1, set on "
                                   "machines without a GPU); the GPU runs tests/test_gpu.py instead")
    for item in items:
        if item.get_closest_marker("interpreter"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One tiny random model per family, saved with save_pretrained and loaded back."""
    models = {}
    for i, fam in enumerate(FAMILIES):
        d = tmp_path_factory.mktemp(f"tiny_{fam}")
        models[fam] = build_tiny_model(fam, seed=100 + i, directory=str(d))
    return models


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_models, family):
    return tiny_models[family]
