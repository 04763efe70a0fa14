"""CUDA graphs of the engine's decode step, one per (batch bucket, steering layout, sampling).

The step (`Engine.decode_step`) has static shapes: it attends over the whole cache length and
lets the kernel's causal bound (read from device tensors) skip unwritten slots, and the step
index lives in a device tensor. A batch of B rows replays the graph of the smallest bucket >= B;
the extra rows are dummy sequences in cache rows the batch does not use.

Graph keys hold what the captured code depends on, and nothing that changes from call to call:
  steering — value-equal options and the artifact object (a new REControl(vf, ...) around the
             same vf is the same key) plus the addresses of the artifact tensors the step reads
             (plan.py `decode_key` / `graph_key`): a graph reads its artifact's tensors where
             they lay at capture, so a different artifact, or one whose tensors moved, is a
             different key — a graph never replays another artifact's weights. (Copying every
             artifact into per-graph static buffers would share graphs across artifacts too,
             but needs a graph-owned copy of each kind of artifact and its host-side constants;
             artifacts are what a caller keeps, so keying by them is as good and far simpler.)
  sampling — greedy or not, top_k, whether top_p filters (`SamplingParams.graph_key`);
             temperature and top_p are device tensors the graph reads (`DeviceSampling`),
             refilled per call.
`Engine.graphs` is a `GraphCache`: least recently used graphs are dropped past its capacity.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from .sampling import DeviceSampling

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_GRAPHS = 64  # GraphCache's default capacity


class GraphCache(OrderedDict):
    """Engine.graphs: key -> graph runner, least recently used first. A capture past `capacity`
    first drops least recently used graphs — never one fetched since the current call began
    (`begin_call`, at the start of every Engine call that uses graphs): those are held by the
    call's runners and must not be re-captured mid-call (a capture writes into the batch's cache
    rows). One call needing more than `capacity` graphs keeps them all until a later call.
    Configure with `engine.graphs.capacity = n` (or `engine.graphs = GraphCache(n)`)."""

    def __init__(self, capacity: int = MAX_GRAPHS, graphs=()):
        super().__init__(graphs)
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"GraphCache capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._this_call: set = set()

    def begin_call(self) -> None:
        """A new call starts: every graph may be dropped again."""
        self._this_call.clear()

    def fetch(self, key, capture, device):
        """The graph of key, made by capture() on a miss."""
        graph = self.get(key)
        if graph is None:
            self._make_room(device)
            graph = self[key] = capture()
        else:
            self.move_to_end(key)
        self._this_call.add(key)
        return graph

    def _make_room(self, device) -> None:
        extra = len(self) + 1 - self.capacity
        old = [k for k in self if k not in self._this_call][:max(extra, 0)]
        if old and device.type == "cuda":
            torch.cuda.synchronize(device)  # a dropped graph's last replay has finished
        for k in old:
            del self[k]


def graph_cache(engine) -> GraphCache:
    """engine.graphs as a GraphCache (made on first use from what is there)."""
    if not isinstance(engine.graphs, GraphCache):
        engine.graphs = GraphCache(graphs=engine.graphs)
    return engine.graphs


def bucket_for(batch: int, max_batch: int) -> int:
    for b in BUCKETS:
        if b >= batch:
            return min(b, max_batch)
    return max_batch


def graph_pool(engine):
    """One memory pool for all graphs of an engine: they replay one at a time, and their
    outputs stay referenced, so sharing keeps the (per exact-row bucket) graphs cheap."""
    if getattr(engine, "graph_pool", None) is None:
        engine.graph_pool = torch.cuda.graph_pool_handle()
    return engine.graph_pool


# the live engines that hold a capture stream (capture_stream keeps their streams distinct)
_CAPTURING_ENGINES: weakref.WeakSet = weakref.WeakSet()
_CAPTURING_ENGINES_LOCK = threading.Lock()  # engines of several threads may capture at once
STREAM_POOL_SIZE = 32  # torch hands out a device's pooled streams round-robin, 32 per priority


def capture_stream(engine) -> torch.cuda.Stream:
    """The one stream every graph of an engine is captured on (made on the engine's device).

    One per engine, used for nothing else: the caching allocator reuses a freed block only for
    the stream it was allocated on, so captures on one stream share the pool's memory (a new
    stream per capture would keep every graph's intermediates apart: the exact-refresh graphs of
    a long call would grow with its length squared). The graphs captured on it share cuBLAS's
    workspace for that stream (one per handle and stream), which is safe as they replay in turn
    on one stream, as eager calls would; cuBLAS's workspace map holds that block, and neither a
    graph's reset() nor the pool's release frees a block in use (torch's CUDAGraph.cpp and
    caching allocator), so an evicted graph takes nothing from the others.

    Distinct from the capture streams of the other live engines: torch's streams come from a
    pool of 32 per device, handed out in turn, so the 33rd stream asked for is the 1st again,
    and two engines captured on one stream would share that workspace — a race if they replayed
    at once on two streams. Past 32 live engines on a device some must share (then replay them
    on one stream). Not torch's default capture stream: that one is shared by the whole
    process and made on whichever device was current at the first capture."""
    if getattr(engine, "graph_stream", None) is None:
        with _CAPTURING_ENGINES_LOCK:
            taken = {(e.graph_stream.device, e.graph_stream.cuda_stream) for e in list(_CAPTURING_ENGINES)}
            for _ in range(STREAM_POOL_SIZE):
                stream = torch.cuda.Stream(engine.device)
                if (stream.device, stream.cuda_stream) not in taken:
                    break
            engine.graph_stream = stream
            _CAPTURING_ENGINES.add(engine)
    return engine.graph_stream


def capture(engine, step):
    """(graph, outputs): warm up on a side stream (compiles the Triton kernels, every branch of
    `run_if` included), then capture. On CPU (engine.graph_emulation, for tests) the same
    warm-up runs, then an `EmulatedGraph` records the step and replays it as a CUDA graph would
    (emulated_graph.py), so the graph path is tested where there is no GPU."""
    if engine.device.type != "cuda":
        from .emulated_graph import EmulatedGraph

        try:
            engine.graph_phase = "warmup"
            step()  # once: its writes land as on a GPU; there is nothing to compile
            graph = engine.graph_phase = EmulatedGraph()
            out = graph.capture(step)
        finally:
            engine.graph_phase = None
        return graph, out
    dev = engine.device
    stream = capture_stream(engine)
    # Warm-up (eager) on a stream of the high-priority pool, never an engine's capture stream
    # (from the normal-priority pool): the capture stream is kept for captures only
    side = torch.cuda.Stream(dev, priority=-1)
    side.wait_stream(torch.cuda.current_stream(dev))
    try:
        engine.graph_phase = "warmup"
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        engine.graph_phase = graph
        # thread_local: a CUDA call of another thread (a sync, say) during the capture is not
        # an error of this capture (torch >= 2.11, pyproject, takes the argument)
        with torch.cuda.graph(graph, pool=graph_pool(engine), stream=stream, capture_error_mode="thread_local"):
            out = step()
    finally:
        engine.graph_phase = None
    return graph, out


def conditional_nodes_supported() -> bool:
    """Whether this torch can capture CUDA-graph conditional (IF) nodes (CUDA >= 12.4)."""
    return torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


def run_if(engine, pred: torch.Tensor, body) -> None:
    """Run body() when the 0-d bool tensor pred is true, without a host sync inside a graph:
    while a graph is captured, body becomes a conditional node that the replay evaluates on
    the device; while warming up for a capture, body always runs (its kernels compile, and the
    writes land before the prefill like the rest of a warm-up); otherwise (eager) pred is read
    on the host. Under graph emulation on CPU the phase is an `EmulatedGraph`, which records a
    conditional node as a GPU capture does. body writes its results in place."""
    if pred.dtype != torch.bool or pred.numel() != 1:  # torch reads it as one bool on the device
        raise TypeError(f"run_if: pred must be a one-element bool tensor, got {pred.dtype} {tuple(pred.shape)}")
    phase = engine.graph_phase
    if phase == "warmup":
        body()
    elif phase is not None:
        phase.begin_capture_to_if_node(pred)
        try:
            body()
        finally:
            phase.end_capture_to_conditional_node()
    elif bool(pred):
        body()


class GraphedDecode:
    """Callable like the eager step: (tok [B], t, P [B], bridge_len [B], seeds [B], p_max) -> (tok, logits)."""

    def __init__(self, engine, bucket: int, plan, sampling):
        self.bucket, self.replays = bucket, 0  # no reference to the engine: it holds us (a cycle kept its GPU memory until a gc)
        dev = engine.device
        self.tok = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.P = torch.ones(bucket, dtype=torch.long, device=dev)
        self.bridge_len = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.t = torch.ones((), dtype=torch.long, device=dev)
        self.sampling = DeviceSampling(sampling, dev)
        # The graph reads the plan's device tensors (rows, member masks, edits) where they lay at
        # capture and keeps no reference to them: the runner keeps them alive. (A later call's
        # plan is a new object; without this its first replay read freed memory.)
        self.plan = plan.materialize(dev)

        def step():
            return engine.decode_step(self.tok, self.t, self.P, self.bridge_len, self.seeds, self.sampling,
                                      plan, engine.max_seq_len)

        # Warm up on a side stream (compiles the Triton kernels), then capture.
        self.graph, self.out = capture(engine, step)

    @classmethod
    def get(cls, engine, batch: int, plan, sampling) -> "GraphedDecode":
        """The decode step reads only the plan's split (the extract layer) and its logits-side
        edits, so one graph serves every mix of SVGT options with that split; it is set to this
        call's temperature and top_p."""
        bucket = bucket_for(batch, engine.max_batch)
        padded = plan.padded(bucket)
        key = (bucket, padded.decode_key, sampling.graph_key)
        graph = graph_cache(engine).fetch(key, lambda: cls(engine, bucket, padded, sampling), engine.device)
        graph.sampling.set(sampling)
        return graph

    def __call__(self, tok, t, P, bridge_len, seeds, p_max):
        B = tok.shape[0]
        self.tok[:B].copy_(tok)
        self.P[:B].copy_(P)
        self.bridge_len[:B].copy_(bridge_len)
        self.seeds[:B].copy_(seeds)
        if B < self.bucket:  # dummy rows: a 1-token prompt each, so slot P + t - 1 stays in range
            self.tok[B:].zero_()
            self.P[B:].fill_(1)
            self.bridge_len[B:].zero_()
        self.t.fill_(t)
        self.graph.replay()
        self.replays += 1
        tok, logits = self.out
        return tok[:B].clone(), logits[:B]


EXACT_ROWS_BUCKET = 32  # refresh="exact" re-runs t response rows: graphs per 32-row bucket


class GraphedRefresh:
    """The refresh step (`Engine.refresh_step`) captured per (batch bucket, steering plan,
    sampling key, due groups, and when an exact group is due the response-row bucket): the value
    heads, the EMA and the upper-stack pass over [bridge ; window ; this token] replay as one
    graph. An exact refresh at step t replays the graph of ceil(t / 32) * 32 rows (the extra
    rows repeat response token 0). The plan is part of the key: a new mix of steering options
    captures new refresh graphs (the decode graph is shared).
    Callable: (tok, t, P, state, seeds, p_max, due) -> (tok, logits, state), state as in
    `Engine.refresh_step`."""

    def __init__(self, engine, bucket: int, plan, sampling, due, exact_rows: int | None = None):
        self.bucket, self.replays = bucket, 0  # no reference to the engine: it holds us (a cycle kept its GPU memory until a gc)
        dev = engine.device
        self.tok = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.P = torch.ones(bucket, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.t = torch.ones((), dtype=torch.long, device=dev)
        self.state = (torch.zeros(bucket, plan.kmax, plan.hidden_size, dtype=plan.dtype, device=dev),  # bridge
                      torch.zeros(bucket, dtype=torch.long, device=dev),                          # bridge_len
                      torch.zeros(bucket, engine.w.hidden_size, dtype=engine.dtype, device=dev),  # h_ref
                      torch.zeros(bucket, dtype=torch.long, device=dev))                          # triggers
        self.sampling = DeviceSampling(sampling, dev)
        self.plan = plan.materialize(dev)  # index tensors made before the capture, kept alive (GraphedDecode)

        def step():
            return engine.refresh_step(self.tok, self.t, self.P, self.state, self.seeds, self.sampling,
                                       plan, engine.max_seq_len, due, exact_rows)

        self.graph, self.out = capture(engine, step)

    @classmethod
    def runner(cls, engine, batch: int, plan, sampling) -> "RefreshRunner":
        """The callable the engine's loop uses (RefreshRunner)."""
        return RefreshRunner(cls, engine, batch, plan, sampling)

    def __call__(self, tok, t, P, state, seeds):
        B = tok.shape[0]
        self.tok[:B].copy_(tok)
        self.P[:B].copy_(P)
        self.seeds[:B].copy_(seeds)
        for buf, val in zip(self.state, state):
            buf[:B].copy_(val)
        if B < self.bucket:  # dummy rows as in GraphedDecode (unsteered in the padded plan)
            self.tok[B:].zero_()
            self.P[B:].fill_(1)
            self.state[1][B:].zero_()
        self.t.fill_(t)
        self.graph.replay()
        self.replays += 1
        tok, logits, new_state = self.out
        return tok[:B].clone(), logits[:B], tuple(x[:B].clone() for x in new_state)


class RefreshRunner:
    """One call's refresh step: picks (capturing on first use) the graph of the due groups and,
    when an exact group is due, of the row bucket. A plain object rather than closures: a
    function reading its own attribute (`run.replays`) sits in a reference cycle, which kept the
    call's engine (caches, graphs: GPU memory) alive after the caller let it go, until a gc."""

    def __init__(self, graph_cls, engine, batch: int, plan, sampling):
        self.graph_cls, self.engine, self.plan, self.sampling = graph_cls, engine, plan, sampling
        self.bucket = bucket_for(batch, engine.max_batch)
        self.padded = plan.padded(self.bucket)
        self.mine = {}  # (due, rows) -> graph for this call (GraphCache never drops them during it)
        self.replays = 0

    def graph_for(self, t, due):
        engine, plan = self.engine, self.plan
        exact = any(plan.groups[i].steering.refresh_spec[0] == "exact" for i in due)
        rows = min(-(-int(t) // EXACT_ROWS_BUCKET) * EXACT_ROWS_BUCKET, engine.max_seq_len) if exact else None
        graph = self.mine.get((due, rows))
        if graph is None:
            key = ("refresh", self.bucket, self.padded.graph_key, self.sampling.graph_key, due, rows)
            graph = graph_cache(engine).fetch(
                key, lambda: self.graph_cls(engine, self.bucket, self.padded, self.sampling, due, rows), engine.device)
            graph.sampling.set(self.sampling)
            self.mine[due, rows] = graph
        return graph

    def __call__(self, tok, t, P, state, seeds, p_max, due):
        self.replays += 1
        return self.graph_for(t, due)(tok, t, P, state, seeds)

    def prepare(self, max_new_tokens: int) -> None:
        """Capture every graph this call will replay now, before the prefill: a capture runs the
        step on dummy inputs, which writes into the batch's cache rows (slot 1, bridge slots),
        and the prefill then overwrites all of it — as for the decode graph."""
        for t in range(1, max_new_tokens):
            due = self.plan.due(t)
            if due:
                self.graph_for(t, due)
