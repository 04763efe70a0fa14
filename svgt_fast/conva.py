"""ConVA (controlled value vector activation; seed paper 002, DESIGN §3).

Per steered layer l, a linear value probe p_l(e) = sigmoid(w_l · e + b_l) on the layer's output
(fit on context-controlled positive / negative examples; v_l = w_l / |w_l| is the value vector)
and a gate probe g_l(e) = sigmoid(u_l · e + c_l) (value-relevant text vs unrelated text). At
inference every token's state at a steered layer is moved along v_l by the smallest eps that
lifts the probe to P0 — only where the gate is open (g_l >= g0) and the probe is below P0:

    e <- e + eps v_l,   eps = (logit(P0) - w_l · e - b_l) / (w_l · v_l)

Layers are steered when their held-out probe accuracy exceeds `min_accuracy` (0.9), never the
last 5 layers. The gate is per token and per layer (the paper's gate is a separate text
classifier; ours reads the backbone's own states, so it costs one more dot product in the same
fused kernel, kernels/conva_edit.py).

Data (JSONL), one object per line:
    {"text": str | [int], "value": 1 | 0 | null}
1 / 0: an example expressing the value / its opposite (ideally context-controlled pairs);
null: an unrelated example (trains the gate only). Features: each layer's state at the last token.
Artifact: config.json (format "svgt_fast.conva") + model.safetensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from . import validate
from .backbone import backbone_info, backbone_parts, check_fits
from .value_module import CONFIG_FILE, WEIGHTS_FILE, load_artifact, save_artifact

FORMAT_NAME = "svgt_fast.conva"
LAST_LAYERS_NEVER = 5


@dataclass
class ConVAConfig:
    hidden_size: int
    num_backbone_layers: int
    layers: list[int]
    accuracies: list[float] = field(default_factory=list)
    gate_accuracies: list[float] = field(default_factory=list)
    backbone_model_type: str | None = None

    def __post_init__(self):
        validate.check_config_fields(self, "ConVAConfig")
        for name in ("accuracies", "gate_accuracies"):
            for i, a in enumerate(getattr(self, name)):
                validate.need_real(f"ConVAConfig: {name}[{i}]", a, 0.0, 1.0)
        if not self.layers:
            raise ValueError("ConVAConfig: no steered layer (no probe reached the accuracy threshold)")
        bad = [l for l in self.layers if not 0 <= l < self.num_backbone_layers - LAST_LAYERS_NEVER]
        if bad:
            raise ValueError(f"ConVAConfig: layers {bad} outside 0..{self.num_backbone_layers - LAST_LAYERS_NEVER - 1} "
                             f"(never the last {LAST_LAYERS_NEVER})")


class ConVAVectors:
    """The fitted probes: w, u [n_layers, d]; b, c [n_layers] (float32), for config.layers."""

    def __init__(self, config: ConVAConfig, w, b, u, c, source: str = "ConVA vectors"):
        validate.check_tensors({"w": w, "b": b, "u": u, "c": c}, self.expected(config), source, "ConVA config")
        self.config = config
        self.w, self.b, self.u, self.c = (t.float() for t in (w, b, u, c))
        norm = self.w.norm(dim=-1, keepdim=True)
        zero = (norm[:, 0] == 0).nonzero().flatten().tolist()
        if zero:  # v = w / |w| would be NaN
            raise ValueError(f"{source}: probe rows {zero} of w are zero (no value direction to steer along)")
        self.v = self.w / norm
        self._host()

    @staticmethod
    def expected(config: ConVAConfig) -> dict:
        """name -> a meta tensor of the shape and dtype kind the config needs."""
        n, d = len(config.layers), config.hidden_size
        return {k: torch.empty(shape, device="meta") for k, shape in (("w", (n, d)), ("b", (n,)), ("u", (n, d)), ("c", (n,)))}

    def _host(self):  # python floats the kernel takes (read once, never inside a step)
        self.b_f = [float(x) for x in self.b]
        self.c_f = [float(x) for x in self.c]
        self.wv_f = [float(x) for x in (self.w * self.v).sum(-1)]

    def to(self, device) -> "ConVAVectors":
        self.w, self.b, self.u, self.c, self.v = (t.to(device) for t in (self.w, self.b, self.u, self.c, self.v))
        return self

    def check_backbone(self, model) -> None:
        c = self.config
        check_fits("ConVA artifact (vectors)", model, hidden_size=c.hidden_size, num_layers=c.num_backbone_layers,
                   model_type=c.backbone_model_type)

    def save_pretrained(self, directory) -> None:
        save_artifact(directory, FORMAT_NAME, asdict(self.config),
                      {k: getattr(self, k).contiguous().cpu() for k in ("w", "b", "u", "c")})

    @classmethod
    def from_pretrained(cls, directory, device=None) -> "ConVAVectors":
        config, state = load_artifact(directory, FORMAT_NAME, "the probes' safetensors weights")
        weights = os.path.join(directory, WEIGHTS_FILE)
        cfg = validate.config_from_dict(ConVAConfig, config, os.path.join(directory, CONFIG_FILE), complete=True)
        validate.check_tensors(state, cls.expected(cfg), weights, "ConVA config")  # names before unpacking
        out = cls(cfg, **state, source=weights)
        return out.to(device) if device is not None else out


@dataclass(frozen=True)
class ConVA:
    """ConVA steering: `generate(..., steering=ConVA(vectors, p0=0.9, g0=0.5))`.
    Compares by value (the artifact by identity), so an equal object built anew for each call
    shares the CUDA graphs of the first (cuda_graphs.py)."""

    vectors: ConVAVectors
    p0: float = 0.9
    g0: float = 0.5

    def __post_init__(self):
        if not isinstance(self.vectors, ConVAVectors):
            raise TypeError(f"ConVA needs ConVAVectors, got {type(self.vectors).__name__}")
        validate.need_real("p0", self.p0, 0.0, 1.0, open_lo=True, open_hi=True)
        validate.need_real("g0", self.g0, 0.0, 1.0, open_lo=True, open_hi=True)

    @property
    def layers(self) -> list[int]:
        return self.vectors.config.layers

    def edit_args(self, k: int) -> tuple:
        """(w, b, v, u, c, p0, g0, wv) of the k-th steered layer for conva_edit(_ref)."""
        V = self.vectors
        return V.w[k], V.b_f[k], V.v[k], V.u[k], V.c_f[k], self.p0, self.g0, V.wv_f[k]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fast path reads in place (a CUDA graph holds their addresses; b, c and w·v
        are host floats, fixed when the vectors are made)."""
        return self.vectors.w, self.vectors.v, self.vectors.u


# ---- eager reference ---------------------------------------------------------------------------
@torch.no_grad()
def generate_row_conva(model, prompt: torch.Tensor, *, steering: ConVA, max_new_tokens: int, sampling,
                       row_seed: int, eos_ids: frozenset[int]) -> list[int]:
    """One unpadded prompt: the unmodified HF model re-run over the whole sequence each step,
    forward hooks on the steered decoder layers editing every position's output."""
    from .kernels.reference import conva_edit_ref
    from .reference import generate_row_hooked

    _, layers, _ = backbone_parts(model)
    handles = []
    for k, l in enumerate(steering.layers):
        w, b, v, u, c, p0, g0, wv = steering.edit_args(k)

        def hook(_m, _i, out, w=w, b=b, v=v, u=u, c=c, p0=p0, g0=g0, wv=wv):
            h = out[0] if isinstance(out, tuple) else out
            on = torch.ones(h.shape[:-1].numel(), dtype=torch.bool, device=h.device)
            new = conva_edit_ref(h, None, w, b, v, u, c, p0, g0, on, wv)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handles.append(layers[l].register_forward_hook(hook))
    return generate_row_hooked(model, prompt, handles, max_new_tokens=max_new_tokens, sampling=sampling,
                               row_seed=row_seed, eos_ids=eos_ids)


# ---- fit ---------------------------------------------------------------------------------------
def _read(path, tokenizer):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
            if not isinstance(ex, dict) or "text" not in ex or "value" not in ex or ex["value"] not in (0, 1, None):
                raise ValueError(f"{path}:{n}: needs text and value (1, 0 or null)")
            text = ex["text"]
            if isinstance(text, str):
                if tokenizer is None:
                    raise ValueError(f"{path}:{n}: text needs a tokenizer")
                text = tokenizer(text)["input_ids"]
            if not isinstance(text, list) or not text or not all(isinstance(i, int) for i in text):
                raise ValueError(f"{path}:{n}: text must be non-empty text or a list of token ids")
            rows.append((text, ex["value"]))
    return rows


def _logreg(x, y, epochs, lr, seed):
    """Logistic regression by full-batch Adam on standardised features; returns (w, b) in the
    original feature space."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + 1e-3 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w_o = (w / sd).detach()
    return w_o, (b - (w / sd * mu).sum()).detach()


def fit_conva(model, data, *, tokenizer=None, min_accuracy: float = 0.9, holdout: float = 0.25, epochs: int = 300,
              lr: float = 0.05, seed: int = 0, progress: bool = True, out_dir=None) -> ConVAVectors:
    """Probe every layer but the last 5 on the value examples (held-out accuracy), keep those
    above min_accuracy, fit each kept layer's gate on value vs unrelated examples, refit the
    probes on all data. Returns the vectors (and saves them to out_dir when given)."""
    from tqdm.auto import tqdm

    rows = _read(data, tokenizer) if isinstance(data, (str, os.PathLike)) else list(data)
    val = [(t, v) for t, v in rows if v is not None]
    if len({v for _, v in val}) < 2:
        raise ValueError("ConVA needs examples of both value 1 and value 0")
    info = backbone_info(model)
    dev = next(model.parameters()).device
    feats = []  # [n_examples, L + 1, d]: every layer's output state at the last token
    with torch.no_grad():
        for text, _ in tqdm(rows, desc="ConVA features", disable=not progress):
            hs = model(input_ids=torch.tensor([text], device=dev), output_hidden_states=True).hidden_states
            feats.append(torch.stack([h[0, -1].float().cpu() for h in hs]))
    feats = torch.stack(feats)
    is_val = torch.tensor([v is not None for _, v in rows])
    y = torch.tensor([float(v) for _, v in val])
    xv = feats[is_val]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(val), generator=g)
    n_test = max(1, int(holdout * len(val)))
    test, train = perm[:n_test], perm[n_test:]
    layers, accs = [], []
    for l in tqdm(range(info.num_layers - LAST_LAYERS_NEVER), desc="ConVA probes", disable=not progress):
        x = xv[:, l + 1]  # hidden_states[l + 1] = output of decoder layer l
        w, b = _logreg(x[train], y[train], epochs, lr, seed)
        acc = float((((x[test] @ w + b) > 0).float() == y[test]).float().mean())
        if acc > min_accuracy:
            layers.append(l)
            accs.append(acc)
    if not layers:
        raise ValueError(f"no layer's probe exceeds accuracy {min_accuracy}: more or cleaner value pairs needed")
    W, B, U, C, gaccs = [], [], [], [], []
    relevant = is_val.float()
    for l in layers:
        w, b = _logreg(xv[:, l + 1], y, epochs, lr, seed)
        W.append(w)
        B.append(b)
        if relevant.min() == relevant.max():  # no unrelated examples: the gate is always open
            U.append(torch.zeros(info.hidden_size))
            C.append(torch.tensor(10.0))
            gaccs.append(float("nan"))
        else:
            u, c = _logreg(feats[:, l + 1], relevant, epochs, lr, seed)
            U.append(u)
            C.append(c)
            gaccs.append(float((((feats[:, l + 1] @ u + c) > 0).float() == relevant).float().mean()))
    cfg = ConVAConfig(info.hidden_size, info.num_layers, layers, accs, gaccs, info.model_type)
    out = ConVAVectors(cfg, torch.stack(W), torch.stack(B), torch.stack(U), torch.stack(C))
    if out_dir is not None:
        out.save_pretrained(out_dir)
    return out
