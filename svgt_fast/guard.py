"""What keeps one Engine safe to share: one generation at a time, and GPU out-of-memory errors
turned into advice.

Thread safety. An Engine owns mutable state (KV caches, the bridge buffer, static graph inputs),
so two generations must never interleave on it. `CallGuard.run` holds a lock for the whole of a
call — for a streamed call, from its first step until the stream ends or is closed — so threads
sharing an Engine queue up and each gets exactly the tokens it would get alone. A second call
from the thread that already holds the engine (a stream left unfinished, then another call) can
never get the lock; it is refused with a RuntimeError instead of deadlocking.

The engine's device. Triton launches a kernel on the *current* CUDA device, and a graph capture
records the current device's stream, whatever device the tensors are on: with a model on cuda:1
and cuda:0 current, kernels would run on the wrong device and a captured graph would replay
nothing. So each step of a call runs with the engine's device current (`on_device`), and only
while the call's own code runs: a stream's consumer sees its own current device between steps.
"""
from __future__ import annotations

import threading

import torch


class EngineBusyError(RuntimeError):
    """A thread asked an Engine for a second generation while its own first one (a stream not yet
    finished or closed) still holds it."""


class CallGuard:
    """A lock around a generator-shaped call (see the module docstring)."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id of the holder (only the holder sets it)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def run(self, gen, oom_advice: str = "", device: torch.device | None = None):
        """Run generator `gen` under the lock (taken at its first step, released when it ends, is
        closed or is garbage-collected) and return its return value; each of its steps with
        `device` current (a CUDA device; others change nothing). torch.OutOfMemoryError raised
        inside becomes a MemoryError carrying `oom_advice`."""
        me = threading.get_ident()
        if self._owner == me:
            gen.close()
            raise EngineBusyError(
                f"this {self.what} is already running a generation in this thread (an unfinished stream?); "
                f"iterate it to the end or close() it first, or use a second Engine")
        self._lock.acquire()
        self._owner = me
        try:
            return (yield from on_device(gen, device))
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(f"out of device memory during generation ({_first_line(exc)})", oom_advice) from None
        finally:
            self._owner = None
            self._lock.release()


def on_device(gen, device: torch.device | None):
    """Generator `gen`, each of its steps (and its close) run with CUDA `device` current; the
    caller's current device is back in place whenever `gen` is suspended."""
    if device is None or device.type != "cuda":
        return (yield from gen)
    try:
        with torch.cuda.device(device):
            item = next(gen)
        while True:
            value = yield item
            with torch.cuda.device(device):
                item = gen.send(value)
    except StopIteration as stop:
        return stop.value
    finally:
        with torch.cuda.device(device):
            gen.close()  # a stream closed early: its cleanup runs on the engine's device too


def out_of_memory(what: str, advice: str) -> MemoryError:
    """A MemoryError whose message says what did not fit and what to change."""
    return MemoryError(f"{what}; {advice}" if advice else what)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
