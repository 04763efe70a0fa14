"""Streaming: `svgt_fast.generate(..., stream=True)`.

Protocol. The call returns a `GenerationStream`, an iterator of `StreamEvent`s: one per decode
step (`event.tokens[i]` = row i's new token, None once row i has finished; `event.texts[i]` the
text it adds when a tokenizer was given), then one final event whose `.output` is the
`GenerationOutput` — the same object `stream=False` returns. After the loop, `stream.output`
holds it too. Nothing runs before the first `next()`; inputs are checked at the call.

Engine side (`TokenFeed`): the fast engine's decode loop yields between graph replays. On CUDA the
tokens of step t are copied to pinned host memory right after step t is enqueued and waited for
only after step t+1 is enqueued, so the device always has the next step queued and the one sync
per step is the one needed to hand the tokens out. On CPU every step is handed out at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


# ---- engine side -------------------------------------------------------------------------------
class TokenFeed:
    """Hands the tokens of a streamed call to the host, step by step (see the module docstring).
    `paused` sums the time the consumer held the generator between steps; `finished` says that
    every row has produced an EOS (the loop may stop)."""

    def __init__(self, batch: int, n_steps: int, device: torch.device, eos_ids: frozenset[int]):
        self.lag = device.type == "cuda"
        self.device = device
        self.host = torch.empty((max(n_steps, 1), batch), dtype=torch.long, pin_memory=self.lag)
        self.event = torch.cuda.Event() if self.lag else None
        self.pending: int | None = None
        self.alive = [True] * batch
        self.eos = eos_ids
        self.paused = 0.0

    @property
    def finished(self) -> bool:
        return not any(self.alive)

    def give(self, t: int, tok: torch.Tensor):
        """Generator: start moving step t's tokens [B] (on the device) to the host, then yield
        (step, tokens) for every step that is ready — the previous one on CUDA, step t on CPU."""
        ready = []
        if self.pending is not None:
            self.event.synchronize()  # the copy of the previous step, queued before step t
            ready.append(self.pending)
            self.pending = None
        self.host[t].copy_(tok, non_blocking=self.lag)
        if self.lag:
            self.event.record(torch.cuda.current_stream(self.device))  # the engine's device, not the current one
            self.pending = t
        else:
            ready.append(t)
        yield from self._hand_out(ready)

    def flush(self):
        """Generator: yield the step still in flight (CUDA), if any."""
        ready = []
        if self.pending is not None:
            self.event.synchronize()
            ready.append(self.pending)
            self.pending = None
        yield from self._hand_out(ready)

    def _hand_out(self, steps):
        for s in steps:
            toks = self.host[s].tolist()
            for i, v in enumerate(toks):
                if self.alive[i] and (v in self.eos or v < 0):  # EOS, or NONFINITE: the row stopped
                    self.alive[i] = False
            paused = time.perf_counter()
            yield s, toks
            self.paused += time.perf_counter() - paused


class Clock:
    """Interval timing without host syncs: CUDA events on a GPU (read once the device is done),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Seconds from mark a to mark b; on CUDA only after the device has passed b."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def run_to_end(gen):
    """Drive a generator to its end; returns its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ---- user side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamEvent:
    """One event of `generate(..., stream=True)`.

    step: index of the new token (0 = the first new token); on the final event, the number of
        steps that ran.
    tokens: [B] row i's token at this step, None when row i had finished before it (its EOS is
        the last token it reports) or stops at it (its logits were not finite: finish reason
        "nonfinite"). Empty on the final event.
    texts: [B] decoded text each row adds at this step ("" while a multi-byte character is
        incomplete), None without a tokenizer. On the final event: what was still held back.
    output: the GenerationOutput, on the final event only.
    """

    step: int
    tokens: list
    texts: list | None = None
    output: object | None = None

    @property
    def final(self) -> bool:
        return self.output is not None


class IncrementalDetokenizer:
    """Text deltas of one row's growing token list: decode a short window before the new tokens
    and emit what it adds, holding back while the text ends in an incomplete character. The
    deltas concatenate to `tokenizer.decode(all_tokens, skip_special_tokens=True)` for byte-level
    and SentencePiece tokenizers alike (the window keeps leading-space rules right)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True) if self.read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class GenerationStream:
    """The iterator `generate(..., stream=True)` returns (see the module docstring).

    `output` is the GenerationOutput once the stream is exhausted; `close()` (or leaving a `with`
    block) stops the generation early and frees the engine for other calls."""

    def __init__(self, steps, batch: int, eos_ids: frozenset[int], tokenizer=None):
        self._steps = steps  # generator of (step, tokens [B]) returning a GenerationOutput
        self._alive = [True] * batch
        self._eos = eos_ids
        self._detok = [IncrementalDetokenizer(tokenizer) for _ in range(batch)] if tokenizer is not None else None
        self._output = None
        self._done = False
        self._n = 0
        self.busy_s = 0.0  # time spent inside next(): what the generation itself cost

    def __iter__(self):
        return self

    def __next__(self) -> StreamEvent:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            step, toks = next(self._steps)
            # a step at which every row had already finished (the engine learns it one step
            # late on CUDA) carries nothing: skip it
            while not any(a for a in self._alive):
                step, toks = next(self._steps)
        except StopIteration as stop:
            self._done = True
            self._output = stop.value
            self.busy_s += time.perf_counter() - t0
            self._output.timings["total_s"] = self.busy_s
            texts = [d.flush() for d in self._detok] if self._detok is not None else None
            return StreamEvent(step=self._n, tokens=[], texts=texts, output=self._output)
        except BaseException:
            self._done = True
            raise
        self.busy_s += time.perf_counter() - t0
        self._n = step + 1
        out = []
        for i, v in enumerate(toks):
            if self._alive[i] and v < 0:  # NONFINITE: the row stopped without a token
                self._alive[i] = False
            if self._alive[i]:
                out.append(v)
                if v in self._eos:
                    self._alive[i] = False
            else:
                out.append(None)
        texts = None
        if self._detok is not None:
            texts = [d.push(v) if v is not None else "" for d, v in zip(self._detok, out)]
        return StreamEvent(step=step, tokens=out, texts=texts)

    @property
    def output(self):
        """The GenerationOutput; only once the stream has been iterated to its end."""
        if self._output is None:
            raise RuntimeError("the stream has not finished yet: iterate it to the end first")
        return self._output

    def close(self) -> None:
        """Stop the generation (if still running) and release the engine."""
        if not self._done:
            self._done = True
            self._steps.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
