"""The CPU stand-in for a CUDA graph (svgt_fast/emulated_graph.py) has a real graph's semantics:
a replay re-runs the recorded kernels on the same memory, never the step's Python; host reads
and host data are refused at capture; conditional nodes run on a device predicate."""
import pytest
import torch

from svgt_fast.emulated_graph import EmulatedGraph, GraphCaptureError, HostReads


def test_replay_reruns_recorded_ops_on_new_inputs():
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(2, 4)

    def step():
        y = torch.relu(x @ w) + 1.0  # out-of-place chain: refilled at replay
        acc.add_(y)                   # in-place on a static buffer: redone at replay
        return y[:, :2], acc          # a view of an intermediate is refilled with it

    g = EmulatedGraph()
    y, out_acc = g.capture(step)
    assert y.isnan().all()  # the graph's own memory holds garbage until the first replay
    for i in range(3):
        x.copy_(torch.randn(2, 3, generator=torch.Generator().manual_seed(i + 1)))
        before = acc.clone()
        g.replay()
        want = torch.relu(x @ w) + 1.0
        assert torch.equal(y, want[:, :2])
        assert torch.equal(out_acc, before + want)


def test_python_values_are_frozen_at_capture():
    """What makes this stand-in worth having: a step that reads a Python value gets the capture's
    value at every replay, as on a GPU (re-running the step's Python would hide that)."""
    x = torch.ones(3)
    scale = {"k": 2.0}
    g = EmulatedGraph()
    out = g.capture(lambda: x * scale["k"])
    scale["k"] = 5.0
    x.fill_(3.0)
    g.replay()
    assert torch.equal(out, torch.full((3,), 6.0))  # the new x, the old k


@pytest.mark.parametrize("read", [
    lambda t: t.item(), lambda t: bool(t.sum() > 0), lambda t: t.tolist(), lambda t: int(t[0]),
    lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: torch.unique(t),
    lambda t: torch.repeat_interleave(t.long().clamp(min=0)),
])
def test_host_reads_are_refused(read):
    t = torch.tensor([1.0, -2.0, 3.0])
    with pytest.raises(GraphCaptureError, match="reads a device value on the host"):
        EmulatedGraph().capture(lambda: read(t))


@pytest.mark.interpreter
def test_host_reads_are_counted_outside_a_capture():
    """HostReads lists the same reads a capture refuses, one entry per read, and leaves out what
    stands for device work: a graph replay (its conditional predicate) and a Triton launch."""
    from svgt_fast.kernels.rms_norm import rms_norm

    t = torch.tensor([1.0, -2.0, 3.0])
    x, w = torch.randn(2, 16), torch.ones(16)
    g = EmulatedGraph()

    def step():
        g.begin_capture_to_if_node(t[0] > 0)
        t.add_(1.0)
        g.end_capture_to_conditional_node()
        return rms_norm(x, w, 1e-6)

    g.capture(step)
    with HostReads() as seen:
        t[0].item(), bool(t.sum() > 0), t.tolist(), int(t[0]), t.nonzero(), t[t > 0], t.numpy()
        assert seen.reads == ["aten._local_scalar_dense"] * 2 + ["Tensor.tolist()", "aten._local_scalar_dense",
                              "aten.nonzero", "aten.index with a boolean mask", "Tensor.numpy()"]
        g.replay()
        rms_norm(x, w, 1e-6)
        y = (t * 2).sum()
    assert len(seen.reads) == 7 and y.item() == 2 * float(t.sum())  # nothing more; not counted after exit


def test_host_data_is_refused_but_scalars_fill():
    t = torch.zeros(4)
    with pytest.raises(GraphCaptureError, match="host data"):
        EmulatedGraph().capture(lambda: t + torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def step():
        u = t + 1.0
        u[0] = 7.0  # a 0-d host value filled on the device: fine, and frozen
        return u

    g = EmulatedGraph()
    u = g.capture(step)
    t.fill_(2.0)
    g.replay()
    assert u.tolist() == [7.0, 3.0, 3.0, 3.0]


def test_conditional_node_runs_on_the_replayed_predicate():
    x = torch.zeros(())
    out = torch.zeros(2)
    g = EmulatedGraph()

    def step():
        pred = x > 0  # computed inside the graph: refilled before the node reads it
        g.begin_capture_to_if_node(pred)
        out.add_(x * torch.ones(2))
        g.end_capture_to_conditional_node()
        return pred

    x.fill_(1.0)
    pred = g.capture(step)  # the capture executes the body once
    assert out.tolist() == [1.0, 1.0]
    x.fill_(-1.0)
    g.replay()
    assert not bool(pred) and out.tolist() == [1.0, 1.0]  # body skipped
    x.fill_(2.0)
    g.replay()
    assert bool(pred) and out.tolist() == [3.0, 3.0]


def test_random_draw_inside_a_conditional_body_is_refused():
    g = EmulatedGraph()

    def step():
        u = torch.rand(2)  # outside a conditional body: fine
        g.begin_capture_to_if_node(u.sum() > 0)
        torch.rand(2)
        g.end_capture_to_conditional_node()

    with pytest.raises(GraphCaptureError, match="inside a conditional node"):
        g.capture(step)


def test_indexing_with_a_0d_device_tensor_is_a_host_read():
    x, i = torch.arange(4.0), torch.tensor(2)
    with pytest.raises(GraphCaptureError, match="reads a device value on the host"):
        EmulatedGraph().capture(lambda: x[i] + 1)


def test_conditional_node_misuse():
    g = EmulatedGraph()
    with pytest.raises(GraphCaptureError, match="one-element bool"):
        g.begin_capture_to_if_node(torch.ones(2, dtype=torch.bool))
    with pytest.raises(GraphCaptureError, match="without begin"):
        g.end_capture_to_conditional_node()

    def unbalanced():
        g.begin_capture_to_if_node(torch.tensor(True))

    with pytest.raises(GraphCaptureError, match="never ended"):
        g.capture(unbalanced)
    with pytest.raises(GraphCaptureError, match="never captured"):
        EmulatedGraph().replay()


@pytest.mark.interpreter
def test_triton_launch_is_recorded_and_replayed():
    """A kernel launch (interpreter) is one node: replayed with its capture-time arguments, its
    own torch work inside not recorded twice."""
    from svgt_fast.kernels.reference import rms_norm_ref
    from svgt_fast.kernels.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 40, generator=gen), torch.randn(40, generator=gen)
    g = EmulatedGraph()
    out = g.capture(lambda: rms_norm(x, w, 1e-6) * 2.0)
    launches = [n for n in g.nodes if type(n).__name__ == "_Launch"]
    assert len(launches) == 1
    for i in range(2):
        x.copy_(torch.randn(3, 40, generator=gen))
        g.replay()
        torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6) * 2.0)


def test_graph_memory_read_before_written_is_garbage():
    """An `empty` the step reads before filling, or the output of a conditional body that has not
    run, holds garbage on a GPU at the first replay: here NaN / the dtype's minimum / True."""
    x = torch.ones(3)
    g = EmulatedGraph()

    def step():
        buf = torch.empty(3)
        stale = buf + x  # reads buf before anything wrote it
        counts = torch.empty(2, dtype=torch.long)
        flags = torch.empty(2, dtype=torch.bool)
        pred = x.sum() < 0  # never true
        g.begin_capture_to_if_node(pred)
        skipped = x * 2.0
        g.end_capture_to_conditional_node()
        return stale, counts, flags, skipped

    stale, counts, flags, skipped = g.capture(step)
    g.replay()
    assert stale.isnan().all() and skipped.isnan().all()
    assert (counts == torch.iinfo(torch.long).min).all() and flags.all()


def test_replay_of_freed_memory_is_refused():
    """A graph keeps addresses, not owners: a tensor it reads that was freed since the capture
    is an error at replay (on a GPU the replay would read whatever lies there now)."""
    x = torch.ones(4)
    held = {"idx": torch.tensor([0, 2])}  # the only owner of the index tensor
    g = EmulatedGraph()
    out = g.capture(lambda: x[held["idx"]] * 3.0)
    g.replay()
    assert out.tolist() == [3.0, 3.0]
    del held["idx"]
    with pytest.raises(GraphCaptureError, match="freed since the capture"):
        g.replay()


def test_views_keep_their_storage_alive_as_on_a_gpu():
    """A view made before the capture and dropped since is fine while its storage lives on
    (the memory is still there); the step's writes through it reach the owner."""
    cache = torch.zeros(2, 3)
    held = {"row": cache[1]}
    g = EmulatedGraph()
    g.capture(lambda: held["row"].add_(1.0))
    del held["row"]
    g.replay()
    assert cache.tolist() == [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]


def test_inference_mode_capture_replays_in_inference_mode():
    with torch.inference_mode():
        x = torch.ones(2)
        buf = torch.zeros(2)
        g = EmulatedGraph()
        g.capture(lambda: buf.add_(x * 2))
    g.replay()  # outside inference mode: the in-place add on an inference tensor still works
    assert buf.tolist() == [4.0, 4.0]
