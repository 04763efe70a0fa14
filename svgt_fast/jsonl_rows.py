"""Prompt/response training rows from JSONL or a list of dicts — the one reader the trainers
share (SVGT's labelled rows, RE-Control's rewarded rows), so both check the same way and name
the offending row (file:line, or "row i" for a list) in every error.

A row is an object with "prompt" and "response" (text, tokenized with the given tokenizer, the
prompt with the tokenizer's special tokens and the response without; or a non-empty list of
token ids, each an int >= 0) plus the trainer's own fields; other keys are ignored.
"""
from __future__ import annotations

import json
import os
from typing import Callable


def read_rows(data, fields: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(where, row)] of a JSONL path or an iterable of dicts, each row holding every name in
    `fields`. FileNotFoundError for a missing file, ValueError (naming the row) for a line that
    is not JSON, a row that is not an object, a missing field or no rows at all."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such data file: {path}")
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        empty = f"{path}: no rows"
    else:
        rows = [(f"row {i}", r) for i, r in enumerate(data)]
        empty = "no rows"
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object with {', '.join(fields)}, got {type(r).__name__}")
        missing = [k for k in fields if k not in r]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} (schema: {', '.join(fields)})")
    if not rows:
        raise ValueError(empty)
    return rows


def encode_pair(row: dict, where: str, tokenizer: Callable | None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a row; ValueError naming the row when text comes without a
    tokenizer or a field is empty or not token ids."""
    out = []
    for key in ("prompt", "response"):
        v = row[key]
        if isinstance(v, str):
            if tokenizer is None:
                raise ValueError(f"{where}: text {key} needs a tokenizer")
            v = tokenizer(v, add_special_tokens=key == "prompt")["input_ids"]
        if not isinstance(v, list) or not v or not all(type(i) is int and i >= 0 for i in v):
            raise ValueError(f"{where}: {key} must be non-empty text or a non-empty list of token ids (ints >= 0)")
        out.append(v)
    return out[0], out[1]
