"""A CPU stand-in for `torch.cuda.CUDAGraph` with a CUDA graph's replay semantics, so the graph
path (cuda_graphs.py) is tested where there is no GPU (`Engine.graph_emulation`, tests only).

A real capture records kernels; a replay re-runs them on the same memory with the arguments they
had at capture. Python does not run at replay: a value the step read on the host, a branch it
took, a Python scalar it passed, stays what it was at capture. So this graph does the same:
`capture(step)` runs step once under a TorchDispatchMode that records every ATen op (custom ops
such as svgt_fast::kv_patch_ included) and every Triton launch (interpreter) with the very tensor
objects it used, and `replay()` re-runs that record — never the step's Python — writing each
out-of-place op's result into the tensor it returned at capture, so every later op, and the
caller holding the outputs, sees the new values. A step whose result depends on host-side
values therefore goes stale here exactly as it would under a real graph, and tests comparing
graphed generation with the reference catch it.

What a capture refuses, as CUDA does: a host read of a device value (`.item()`, `bool(t)`,
`.tolist()`, `nonzero`, boolean-mask indexing — ops whose output size or value the host must
wait for) and a tensor made from host data (`torch.tensor([...])`, a pageable copy onto the
device; a 0-d one is let through as a constant: `x[i] = 0.0` fills on the device).
`begin_capture_to_if_node(pred)` / `end_capture_to_conditional_node()` record a conditional
node whose body replays only when pred (read at replay) is true.

Memory: a real graph keeps addresses, not owners. This one holds only what it allocated (its
pool) and reaches everything else through weak references, so a replay that would read memory
freed since the capture raises instead of reading whatever the allocator put there. A real
capture runs nothing, so its memory holds garbage until a replay writes it: this one poisons
what it allocated after capturing (the capture does execute the step, to record it).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read back (a sync, illegal while a CUDA stream is captured).
HOST_SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select", "equal",
    "allclose", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc",
    "repeat_interleave",  # the Tensor-repeats form sizes its output from the values (no output_size)
})
# Random ops: refused inside a conditional body (the graph's RNG offset bookkeeping assumes every
# recorded draw runs at each replay); fine elsewhere in a graph.
RANDOM_OPS = frozenset({
    "uniform", "uniform_", "normal", "normal_", "bernoulli", "bernoulli_", "exponential", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "multinomial", "rand", "rand_like", "randn", "randn_like",
    "randint", "randint_like", "randperm", "native_dropout", "poisson", "_standard_gamma", "binomial",
})
# Tensor methods that read values on the host without dispatching an op on a CPU tensor.
HOST_READ_METHODS = frozenset({"item", "tolist", "numpy", "__array__"})
# Tensors made from host data: a pageable host-to-device copy, which a capture refuses.
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
# Allocations: nothing to re-run (a graph's pool hands back the same memory, contents left as they are).
ALLOC_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})


class GraphCaptureError(RuntimeError):
    """The captured step did something a CUDA graph capture cannot record."""


def _is_mask(index) -> bool:
    """A boolean index tensor: its selection is sized by nonzero, on the host."""
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _op_name(func) -> str:
    return func.__name__.split(".")[0]


def _writes_or_views(func) -> bool:
    """The op's results alias its inputs (a view, an in-place or out= op): re-running it redoes
    the write (or nothing), there is no fresh output to fill."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _fill(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        if dst.shape != src.shape:
            raise GraphCaptureError(f"replay produced shape {tuple(src.shape)} where the capture had {tuple(dst.shape)}")
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _fill(d, s)


def _garbage(dtype: torch.dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).min


def _tensors(x):
    """The tensors in an argument tree (tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _map(x, f):
    """The argument tree with each tensor t replaced by f(t)."""
    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map(y, f) for y in x)
    if isinstance(x, dict):
        return {k: _map(y, f) for k, y in x.items()}
    return x


class _Ptr:
    """What a real graph keeps of a tensor it did not allocate: its address and layout, not an
    owner. Resolved at each replay; memory freed since the capture is an error, where a GPU would
    silently read (or write) whatever the allocator has put there since."""
    __slots__ = ("weak", "dtype", "device", "size", "stride", "offset")

    def __init__(self, t: torch.Tensor, weak):
        self.weak, self.dtype, self.device = weak, t.dtype, t.device
        self.size, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()

    def resolve(self) -> torch.Tensor:
        storage = torch.UntypedStorage._new_with_weak_ptr(self.weak.cdata)
        if storage is None:
            raise GraphCaptureError(
                f"replay reads memory freed since the capture (a {self.dtype} tensor of shape {list(self.size)}): "
                f"a CUDA graph keeps only addresses, so whatever the step reads that it did not allocate must be "
                f"kept alive as long as the graph")
        return torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, self.offset, self.size, self.stride)


def _resolved(x):
    """The argument tree with each _Ptr resolved to a tensor."""
    if isinstance(x, _Ptr):
        return x.resolve()
    if isinstance(x, (tuple, list)):
        return type(x)(_resolved(y) for y in x)
    if isinstance(x, dict):
        return {k: _resolved(y) for k, y in x.items()}
    return x


class _Op:
    __slots__ = ("func", "args", "kwargs", "out", "ptrs")

    def __init__(self, func, args, kwargs, out):
        self.func, self.args, self.kwargs, self.out, self.ptrs = func, args, kwargs, out, False

    def inputs(self):
        return (self.args, self.kwargs)

    def unpin(self, f):
        self.args, self.kwargs = _map(self.args, f), _map(self.kwargs, f)
        self.ptrs = True

    def run(self) -> None:
        args, kwargs = (_resolved(self.args), _resolved(self.kwargs)) if self.ptrs else (self.args, self.kwargs)
        new = self.func(*args, **kwargs)
        if self.out is not None:
            _fill(self.out, new)


class _Alloc:
    """Memory the graph allocated (or a 0-d constant it baked in): nothing to redo at replay (a
    graph's pool hands back the same memory, contents left as they are); kept so the graph knows
    the memory is its own."""
    __slots__ = ("out", "constant")

    def __init__(self, out, constant: bool = False):
        self.out, self.constant = out, constant

    def inputs(self):
        return ()

    def run(self) -> None:
        pass


class _Launch:
    """One Triton kernel launch (interpreter), re-run with its capture-time arguments and grid."""
    __slots__ = ("run_launch", "kernel", "args", "kwargs", "ptrs")
    out = None

    def __init__(self, run_launch, kernel, args, kwargs):
        self.run_launch, self.kernel, self.args, self.kwargs, self.ptrs = run_launch, kernel, args, kwargs, False

    inputs, unpin = _Op.inputs, _Op.unpin

    def run(self) -> None:
        args, kwargs = (_resolved(self.args), _resolved(self.kwargs)) if self.ptrs else (self.args, self.kwargs)
        self.run_launch(self.kernel, *args, **kwargs)


class _If:
    __slots__ = ("pred", "body", "ptrs")
    out = None

    def __init__(self, pred):
        self.pred, self.body, self.ptrs = pred, [], False

    def inputs(self):
        return (self.pred,)

    def unpin(self, f):
        self.pred, self.ptrs = f(self.pred), True

    def run(self) -> None:
        if bool(self.pred.resolve() if self.ptrs and isinstance(self.pred, _Ptr) else self.pred):
            for node in self.body:
                node.run()


def host_read_op(func, args) -> str | None:
    """The host read an ATen op makes (on the GPU a sync: the host waits for the value or the
    output size), named; None for an op that makes none."""
    name = _op_name(func)
    if name in HOST_SYNC_OPS:
        return f"aten.{name}"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(_is_mask(i) for i in args[1]):
        return f"aten.{name} with a boolean mask"
    return None


def _host_read(what: str) -> GraphCaptureError:
    return GraphCaptureError(
        f"{what} inside a captured step: it reads a device value on the host (a sync), which a CUDA graph "
        f"capture refuses and a replay could not redo")


class _HostReads(TorchFunctionMode):
    """Refuses .item() / .tolist() / .numpy(): on a CPU tensor they read memory without
    dispatching an op, so the dispatch-level recorder alone would not see them."""

    def __init__(self, graph: "EmulatedGraph"):
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.graph._in_launch and getattr(func, "__name__", "") in HOST_READ_METHODS:
            raise _host_read(f"Tensor.{func.__name__}()")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "EmulatedGraph"):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        graph, name = self.graph, _op_name(func)
        if graph._in_launch:  # the interpreter's own work inside a recorded Triton launch
            return func(*args, **kwargs)
        read = host_read_op(func, args)
        if read is not None:
            raise _host_read(read)
        if name in HOST_DATA_OPS and args[0].dim() > 0:  # a 0-d one is a scalar (x[i] = 0.0 fills on the device)
            raise GraphCaptureError(
                "a tensor made from host data inside a captured step (torch.tensor(...)): a capture refuses the "
                "pageable copy, and the value would be frozen; make it before the capture")
        if name in RANDOM_OPS and len(graph._nodes) > 1:
            raise GraphCaptureError(f"aten.{name} inside a conditional node: draw the random numbers outside the "
                                    f"conditional body")
        out = func(*args, **kwargs)
        if name in ALLOC_OPS or name in HOST_DATA_OPS:
            graph._nodes[-1].append(_Alloc(out, constant=name in HOST_DATA_OPS))
        else:
            graph._nodes[-1].append(_Op(func, args, kwargs, None if _writes_or_views(func) else out))
        return out


class EmulatedGraph:
    """`torch.cuda.CUDAGraph`'s interface as the engine uses it: capture (here a method that
    takes the step), replay, and the conditional-node pair used by `cuda_graphs.run_if`."""

    def __init__(self):
        self._nodes: list[list] = [[]]  # the node list being recorded; [0] is the graph's own
        self._in_launch = False
        self._inference = False  # replay in inference mode when the capture ran in it
        self.captured = False

    @property
    def nodes(self) -> list:
        return self._nodes[0]

    def capture(self, step):
        """Run step() once, recording it; returns its outputs (the tensors replay() refills)."""
        if self.captured:
            raise GraphCaptureError("this graph is already captured")
        from triton.runtime.interpreter import InterpretedFunction

        launch = InterpretedFunction.run

        def recorded_launch(kernel, *args, **kwargs):
            if self._in_launch:
                return launch(kernel, *args, **kwargs)
            self._nodes[-1].append(_Launch(launch, kernel, args, kwargs))
            self._in_launch = True
            try:
                return launch(kernel, *args, **kwargs)
            finally:
                self._in_launch = False

        self._inference = torch.is_inference_mode_enabled()
        InterpretedFunction.run = recorded_launch
        try:
            with _HostReads(self), _Recorder(self):
                out = step()
        finally:
            InterpretedFunction.run = launch
        if len(self._nodes) != 1:
            raise GraphCaptureError("a conditional node was begun and never ended")
        own = self._unpin(self.nodes)
        with torch.inference_mode(self._inference), torch.no_grad():
            self._poison(self.nodes, own)
        self.captured = True
        return out

    def _unpin(self, nodes) -> None:
        """Hold what the graph allocated (its pool) and nothing else: every tensor on memory the
        graph did not allocate becomes a `_Ptr`. Memory is the graph's own when it first shows up
        as an op's fresh output, before any op read it."""
        from torch.multiprocessing.reductions import StorageWeakRef

        own, seen, weak, ptrs = set(), set(), {}, {}

        def ptr(t: torch.Tensor):
            key = t.untyped_storage()._cdata
            if key in own:
                return t
            if id(t) not in ptrs:
                if key not in weak:
                    weak[key] = StorageWeakRef(t.untyped_storage())
                ptrs[id(t)] = (_Ptr(t, weak[key]), t)  # t held until the walk ends: ids stay unique
            return ptrs[id(t)][0]

        def walk(nodes):
            for node in nodes:
                ins = list(_tensors(node.inputs()))
                seen.update(t.untyped_storage()._cdata for t in ins)
                if any(t.untyped_storage()._cdata not in own for t in ins):
                    node.unpin(ptr)
                own.update(k for t in _tensors(node.out) if (k := t.untyped_storage()._cdata) not in seen)
                if isinstance(node, _If):
                    walk(node.body)

        walk(nodes)
        ptrs.clear()  # drop the walk's own references now (walk is a closure cycle, freed late)
        return own

    def _poison(self, nodes, own) -> None:
        """A real capture runs nothing: the graph's memory holds garbage until a replay writes
        it. So does this one's (NaN, the dtype's minimum, True), so a replay that reads memory of
        the graph before writing it — an `empty` read before it is filled, the output of a
        conditional body that did not run — shows up instead of reading the capture's values."""
        for node in nodes:
            if isinstance(node, _If):
                self._poison(node.body, own)
            elif not (isinstance(node, _Alloc) and node.constant):
                for t in _tensors(node.out):
                    if t.untyped_storage()._cdata in own:
                        t.fill_(_garbage(t.dtype))

    def begin_capture_to_if_node(self, pred: torch.Tensor) -> None:
        if not (isinstance(pred, torch.Tensor) and pred.dtype == torch.bool and pred.numel() == 1):
            raise GraphCaptureError(f"a conditional node needs a one-element bool tensor, got {pred!r}")
        node = _If(pred)
        self._nodes[-1].append(node)
        self._nodes.append(node.body)

    def end_capture_to_conditional_node(self) -> None:
        if len(self._nodes) == 1:
            raise GraphCaptureError("end_capture_to_conditional_node without begin_capture_to_if_node")
        self._nodes.pop()

    def replay(self) -> None:
        if not self.captured:
            raise GraphCaptureError("replay of a graph that was never captured")
        with torch.inference_mode(self._inference), torch.no_grad():
            for node in self.nodes:
                node.run()


class HostReads:
    """Context manager that lists the host reads of tensor values made inside it: the ops a
    capture refuses (`host_read_op`) and .item() / .tolist() / .numpy(). On the GPU each is a
    sync, so a decode loop's count per step says whether the host waits for the device every
    step. Not counted: what stands in for device work here — a Triton launch (the interpreter
    reads its arguments on the host) and an EmulatedGraph replay (it reads a conditional node's
    predicate, which a real graph evaluates on the device). Not seen on CPU: `.cpu()` /
    `.to("cpu")` (no copy there)."""

    def __init__(self):
        self.reads: list[str] = []
        self._in_launch = False

    def _unobserved(self, fn):
        def run(*args, **kwargs):
            was, self._in_launch = self._in_launch, True
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_launch = was
        return run

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._saved = InterpretedFunction.run, EmulatedGraph.replay
        InterpretedFunction.run = self._unobserved(InterpretedFunction.run)
        EmulatedGraph.replay = self._unobserved(EmulatedGraph.replay)
        self._modes = (_CountMethods(self), _CountOps(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        InterpretedFunction.run, EmulatedGraph.replay = self._saved
        return False


class _CountMethods(TorchFunctionMode):
    def __init__(self, counter: HostReads):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.counter._in_launch and name in HOST_READ_METHODS - {"item"}:  # item dispatches: counted there
            self.counter.reads.append(f"Tensor.{name}()")
        return func(*args, **(kwargs or {}))


class _CountOps(TorchDispatchMode):
    def __init__(self, counter: HostReads):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counter._in_launch:
            read = host_read_op(func, args)
            if read is not None:
                self.counter.reads.append(read)
        return func(*args, **(kwargs or {}))

