"""Named backbone shapes for benchmarks, built with random weights (timing does not depend on
weight values). The table lives in `svgt_fast.bench.SHAPES` so that `svgt-fast bench` has it too."""
from __future__ import annotations

from svgt_fast.bench import SHAPES, build_random_model

__all__ = ["SHAPES", "build_model"]


def build_model(shape: str, device, dtype):
    return build_random_model(shape, device, dtype)
