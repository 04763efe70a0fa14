"""Per-request steering: which steering each row of a batch runs (DESIGN §2, per-request configs).

Rows may also carry a logits-side edit (RE-Control): those act on the final norm's output only,
grouped the same way (`edits`).

Steering objects compare by value (their artifact — value module, value function, vectors,
neurons — by identity), so rows group, and plans compare, by what they compute: a plan rebuilt
for each call, from steering objects rebuilt for each call, finds the CUDA graphs of the first
(`decode_key`, `graph_key`).

A batch may mix rows without steering and rows with different SVGT options or modules of the
same backbone (K, strength, refresh interval, refresh mode, policy). Rows with equal steering
form a group; the value head runs once per group on its rows, and every per-row
difference (K, bridge gate, refresh schedule) lives in device tensors, so each row computes what
it would compute alone. Constraint: all modules of a batch read the same extract layer (the
lower/upper split is one per forward) and hold the same dtype (one bridge state tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .conva import ConVA
from .neva import NeVA
from .re_control import REControl
from .steering import SVGT


@dataclass(frozen=True)
class Group:
    steering: SVGT | REControl | ConVA | NeVA
    rows: tuple[int, ...]

    @property
    def k(self) -> int:
        return self.steering.n_tokens


class SteeringPlan:
    """per_row: one SVGT or None per batch row."""

    def __init__(self, per_row: list):
        self.per_row = tuple(per_row)
        self.B = len(per_row)
        groups: dict[SVGT, list[int]] = {}
        edits: dict[REControl, list[int]] = {}
        layer_groups: dict[ConVA, list[int]] = {}
        mlp_groups: dict[NeVA, list[int]] = {}
        for i, st in enumerate(per_row):
            if isinstance(st, SVGT):
                groups.setdefault(st, []).append(i)
            elif isinstance(st, REControl):
                edits.setdefault(st, []).append(i)
            elif isinstance(st, ConVA):
                layer_groups.setdefault(st, []).append(i)
            elif isinstance(st, NeVA):
                mlp_groups.setdefault(st, []).append(i)
            elif st is not None:
                raise TypeError(f"row {i}: steering must be None, svgt_fast.SVGT(...), svgt_fast.REControl(...), "
                                f"svgt_fast.ConVA(...) or svgt_fast.NeVA(...), got {type(st).__name__}")
        self.groups = tuple(Group(st, tuple(rows)) for st, rows in groups.items())
        self.edits = tuple(Group(st, tuple(rows)) for st, rows in edits.items())
        self.layer_groups = tuple(Group(st, tuple(rows)) for st, rows in layer_groups.items())
        self.mlp_groups = tuple(Group(st, tuple(rows)) for st, rows in mlp_groups.items())
        self.steered = bool(self.groups)
        if self.steered:
            layers = {g.steering.module.config.extract_layer for g in self.groups}
            if len(layers) > 1:
                raise ValueError(f"one batch mixes value modules of extract layers {sorted(layers)}; "
                                 "rows of a batch must share the extract layer (run them in separate calls)")
            dtypes = {g.steering.module.dtype for g in self.groups}
            if len(dtypes) > 1:
                raise ValueError(f"one batch mixes value modules of dtypes {sorted(map(str, dtypes))}; "
                                 "cast them to one dtype")
            self.extract_layer = layers.pop()
            self.dtype = dtypes.pop()
            self.hidden_size = self.groups[0].steering.module.config.hidden_size
        self.kmax = max((g.k for g in self.groups), default=0)

    @classmethod
    def build(cls, steering, batch: int) -> "SteeringPlan":
        """steering: None, one SVGT / REControl for every row, or a list with one per row."""
        if steering is None or isinstance(steering, (SVGT, REControl, ConVA, NeVA)):
            return cls([steering] * batch)
        if isinstance(steering, (list, tuple)):
            if len(steering) != batch:
                raise ValueError(f"steering list has {len(steering)} entries for a batch of {batch} prompts")
            return cls(list(steering))
        raise TypeError(f"steering must be None, svgt_fast.SVGT(...) or a list of them, got {type(steering).__name__}")

    def padded(self, batch: int) -> "SteeringPlan":
        """The same plan with unsteered dummy rows up to `batch` (CUDA-graph buckets)."""
        return self if batch == self.B else SteeringPlan(list(self.per_row) + [None] * (batch - self.B))

    def due(self, t: int) -> tuple[int, ...]:
        """Indices of the groups whose value module is due at decode step t."""
        return tuple(i for i, g in enumerate(self.groups) if t % g.steering.refresh_interval == 0)

    # Device copies of the plan's index tensors, made once per device: a host-to-device copy
    # is not allowed while a CUDA graph is being captured, so the steps only read these.
    def _on(self, device) -> dict:
        device = torch.device(device)
        cache = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            k = [0] * self.B
            for g in self.groups:
                for r in g.rows:
                    k[r] = g.k
            everyone = self._everyone
            rows = [torch.tensor(g.rows, dtype=torch.long, device=device) for g in everyone]
            members = []
            for g in everyone:
                m = torch.zeros(self.B, dtype=torch.bool)
                m[list(g.rows)] = True
                members.append(m.to(device))
            for g in self.edits:  # RE-Control value functions live where the batch runs
                g.steering.value_fn.to(device)
            for g in self.groups:
                g.steering.module.to(device)
            layer_edits: dict[int, list] = {}
            for g in self.layer_groups:
                g.steering.vectors.to(device)
                member = members[everyone.index(g)]
                for j, layer in enumerate(g.steering.layers):
                    layer_edits.setdefault(layer, []).append((g.steering, j, member))
            mlp_edits: dict[int, list] = {}
            for g in self.mlp_groups:
                member = members[everyone.index(g)]
                for (a, c), layer in zip(g.steering.edits(device), g.steering.layers):
                    mlp_edits.setdefault(layer, []).append((a, c, member))
            cache[device] = {"row_k": torch.tensor(k, dtype=torch.long, device=device), "rows": rows,
                             "members": members, "layer_edits": layer_edits, "mlp_edits": mlp_edits}
        return cache[device]

    def materialize(self, device) -> "SteeringPlan":
        self._on(device)
        return self

    def row_k(self, device) -> torch.Tensor:
        """K of each row's steering (0 without) [B]."""
        return self._on(device)["row_k"]

    def rows(self, g: Group, device) -> torch.Tensor:
        """The batch rows of group (or edit group) g [n]."""
        return self._on(device)["rows"][self._everyone.index(g)]

    @property
    def _everyone(self) -> tuple:
        return self.groups + self.edits + self.layer_groups + self.mlp_groups

    def mlp_edits(self, device) -> dict:
        """{layer: [(a [I], c [I], member [B] bool), ...]} for the NeVA rows of the batch."""
        return self._on(device)["mlp_edits"]

    def layer_edits(self, device) -> dict:
        """{layer: [(ConVA, k, member [B] bool), ...]} for the ConVA rows of the batch."""
        return self._on(device)["layer_edits"]

    @property
    def decode_key(self) -> tuple:
        """What a captured decode step reads of the plan: the lower/upper split, the edit groups
        (RE-Control, ConVA, NeVA: options and rows) and where their artifacts' tensors lie."""
        edits = self.edits + self.layer_groups + self.mlp_groups
        return (self.extract_layer if self.steered else None, edits, _storage(edits))

    @property
    def graph_key(self) -> tuple:
        """What a captured refresh step reads of the plan: all of it, and where its artifacts'
        tensors lie."""
        return (self, _storage(self._everyone))

    def member(self, g: Group, device) -> torch.Tensor:
        """[B] bool: rows of group g."""
        return self._on(device)["members"][self._everyone.index(g)]

    def __hash__(self):
        return hash(self.per_row)

    def __eq__(self, other):
        return isinstance(other, SteeringPlan) and self.per_row == other.per_row


def _storage(groups) -> tuple:
    """Where every artifact tensor the groups' steps read in place lies. A graph
    replays the addresses it captured: an artifact whose tensors were replaced since (moved to
    another device or dtype, a parameter reassigned) must find another graph, never replay freed
    or stale memory. Updates in place keep the addresses and reach graph and eager path alike."""
    return tuple((t.device, t.data_ptr(), t.dtype, t.shape) for g in groups for t in g.steering.tensors())
