"""Shared test data."""
import torch


def ragged_prompts(seed: int, lengths=(7, 3, 11), vocab: int = 256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
