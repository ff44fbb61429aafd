"""Mixture-of-Experts layers: recognized by module, routed on the host, experts on the NPU.

torch.export cannot capture the token dispatch of open MoE code (its shapes depend on the
data), so the compiler recognizes MoE *modules* before capture and stands a custom op,
``fp8npu::moe``, in for each one; the op has a static shape (out = x's), so the rest of the
model captures as usual. Recognized (attribute names of the Hugging Face implementations):

* **Mixtral / Qwen-MoE style**: ``gate`` (a Linear, E outputs), ``experts`` (a ModuleList of
  MLPs with ``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2``), ``top_k`` (or
  ``num_experts_per_tok``); softmax scores, top-k, renormalized unless ``norm_topk_prob`` is
  False; optional ``shared_expert`` with a sigmoid ``shared_expert_gate``;
* **DeepSeek-V3 style**: ``gate`` with ``weight`` and ``e_score_correction_bias``, sigmoid
  scores, the bias only for choosing, group-limited choice (``n_group``, ``topk_group``),
  ``norm_topk_prob``, ``routed_scaling_factor``; optional ``shared_experts`` (an MLP);
* experts kept as **3-D tensors** (``experts.gate_up_proj`` [E, 2F, D] and
  ``experts.down_proj`` [E, D, F]) instead of a list of modules.

At run time (:func:`run_moe`, the same for every backend) the host computes the router in
FP32, the scores, the top-k choice and the weights; every expert that received tokens runs
its tokens as one batch: ``gate_up`` (the expert's gate and up projections as one weight
[2F, D], quantized together) on the NPU, ``act(g) * u`` on the host, ``down`` on the NPU;
the outputs are weighted and summed on the host in increasing expert order. The expert
GEMMs' row count is known only then: their programs are lowered at run time for the next
power of two of it (the weights were packed into DRAM at compile time in a layout that does
not depend on the row count), and cached.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["MoESpec", "detect", "substitute", "run_moe", "ACTIVATIONS"]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}

_MODULES = {}       # spec id -> the original module (eager runs of the custom op only)


@torch.library.custom_op("fp8npu::moe", mutates_args=())
def moe_op(x: torch.Tensor, weights: list[torch.Tensor], spec_id: int) -> torch.Tensor:
    """A recognized MoE layer (eager: the original module)."""
    return _MODULES[spec_id](x).clone()


@moe_op.register_fake
def _moe_fake(x, weights, spec_id):
    return torch.empty_like(x)


@dataclass(frozen=True)
class MoESpec:
    """What a recognized MoE layer computes (stored in the model file)."""

    style: str                 # "softmax" or "sigmoid"
    experts: int
    top_k: int
    norm_topk: bool
    d_model: int
    d_ff: int
    act: str
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    choice_bias: bool = False
    shared: str = ""           # "", "plain" (DeepSeek) or "gated" (Qwen)
    d_ff_shared: int = 0

    def to_dict(self):
        return asdict(self)


def _act_name(mlp):
    fn = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
    if fn is None:
        return "silu"
    for name, cls in (("silu", torch.nn.SiLU), ("gelu", torch.nn.GELU), ("relu", torch.nn.ReLU)):
        if isinstance(fn, cls):
            if name == "gelu" and getattr(fn, "approximate", "none") == "tanh":
                return "gelu_tanh"
            return name
    if fn in (F.silu, torch.nn.functional.silu):
        return "silu"
    if fn is F.gelu:
        return "gelu"
    if fn is F.relu:
        return "relu"
    raise ValueError(f"unsupported expert activation {fn!r}; supported: {', '.join(ACTIVATIONS)}")


def _mlp_weights(mlp):
    """(gate [F, D], up [F, D], down [D, F]) of a gated MLP module."""
    for g, u, d in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in (g, u, d)):
            lins = [getattr(mlp, n) for n in (g, u, d)]
            if any(lin.bias is not None for lin in lins):
                raise ValueError("expert projections with biases are not supported")
            return tuple(lin.weight for lin in lins)
    return None


def detect(module):
    """(MoESpec, [weight tensors]) if ``module`` is a recognized MoE layer, else None. The weight
    list: router [E, D], then the choice bias [E] (DeepSeek), then per expert gate_up [2F, D]
    and down [D, F], then the shared expert's gate_up and down (and its gate [1, D], Qwen)."""
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    router = getattr(gate, "weight", None)
    if experts is None or not isinstance(router, torch.Tensor) or router.dim() != 2:
        return None
    n_exp, d = router.shape
    top_k = next((getattr(o, a) for o in (module, gate) for a in ("top_k", "num_experts_per_tok")
                  if isinstance(getattr(o, a, None), int)), None)
    if top_k is None:
        return None
    bias = getattr(gate, "e_score_correction_bias", None)
    scoring = getattr(gate, "scoring_func", getattr(module, "scoring_func", None))
    style = "sigmoid" if (bias is not None or scoring == "sigmoid") else "softmax"
    weights = [router]
    if bias is not None:
        weights.append(bias)
    if isinstance(experts, torch.nn.ModuleList):
        if len(experts) != n_exp:
            return None
        per = [_mlp_weights(e) for e in experts]
        if any(p is None for p in per):
            return None
        act = _act_name(experts[0])
        d_ff = per[0][0].shape[0]
        for g, u, dn in per:
            weights += [torch.cat([g, u], dim=0).detach(), dn]
    else:
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == dn.dim() == 3):
            return None
        if gu.shape[1] == d and gu.shape[2] != d:          # [E, D, 2F]: transposed storage
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        act = _act_name(experts)
        d_ff = gu.shape[1] // 2
        for e in range(n_exp):
            weights += [gu[e].detach(), dn[e].detach()]
    norm_default = style == "softmax" and not hasattr(module, "norm_topk_prob")
    norm = bool(getattr(module, "norm_topk_prob", getattr(gate, "norm_topk_prob", norm_default)))
    shared, d_ff_shared = "", 0
    sh = getattr(module, "shared_experts", None) or getattr(module, "shared_expert", None)
    if sh is not None:
        w = _mlp_weights(sh)
        if w is None:
            return None
        weights += [torch.cat([w[0], w[1]], dim=0).detach(), w[2]]
        d_ff_shared = w[0].shape[0]
        sgate = getattr(module, "shared_expert_gate", None)
        if isinstance(sgate, torch.nn.Linear):
            weights.append(sgate.weight)
            shared = "gated"
        else:
            shared = "plain"
    spec = MoESpec(style, n_exp, top_k, norm, d, d_ff, act,
                   n_group=int(getattr(gate, "n_group", getattr(module, "n_group", 1)) or 1),
                   topk_group=int(getattr(gate, "topk_group", getattr(module, "topk_group", 1)) or 1),
                   scaling=float(getattr(gate, "routed_scaling_factor", getattr(module, "routed_scaling_factor", 1.0))
                                 or 1.0),
                   choice_bias=bias is not None, shared=shared, d_ff_shared=d_ff_shared)
    return spec, weights


class substitute:
    """``with substitute(model) as specs:`` — every recognized MoE module's forward calls the
    ``fp8npu::moe`` op instead (restored on exit); ``specs`` lists (path, MoESpec)."""

    def __init__(self, model):
        self.model = model
        self.saved = []
        self.specs = []

    def __enter__(self):
        for path, mod in self.model.named_modules():
            if any(path.startswith(p + ".") for p, _ in self.specs):
                continue
            found = detect(mod)
            if found is None:
                continue
            spec, weights = found
            spec_id = len(self.specs)
            self.specs.append((path or "<top>", spec))
            _MODULES[spec_id] = mod
            params = list(weights)

            def forward(x, _params=params, _id=spec_id):
                return torch.ops.fp8npu.moe(x, _params, _id)
            self.saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = forward
        return self.specs

    def __exit__(self, *exc):
        for mod, old in self.saved:
            if old is None:
                del mod.forward
            else:
                mod.forward = old
        return False


def route(spec, x, weights):
    """(expert indices [T, k], weights [T, k]) of every token, in FP32 on the host."""
    router = weights[0].to(torch.float32)
    logits = x @ router.T
    if spec.style == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits)
    choice = scores + weights[1].to(torch.float32) if spec.choice_bias else scores
    if spec.n_group > 1:
        t = choice.shape[0]
        grouped = choice.view(t, spec.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, -1)
        choice = choice.masked_fill(mask == 0, float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1, sorted=True).indices
    w = scores.gather(1, idx)
    if spec.norm_topk:
        w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if spec.style == "sigmoid" else 0.0))
    return idx, w * spec.scaling


def run_moe(spec, x, weights, qlinear):
    """The MoE layer on ``x`` [..., D]; ``qlinear(tokens [m, D], which, expert)`` computes one
    expert projection (``which`` "gate_up" or "down", expert -1 for the shared one)."""
    shape = x.shape
    x2 = x.reshape(-1, spec.d_model).to(torch.float32)
    act = ACTIVATIONS[spec.act]
    idx, w = route(spec, x2, weights)
    out = torch.zeros_like(x2)
    f = spec.d_ff
    for e in range(spec.experts):
        hit = (idx == e)
        tokens = hit.any(dim=1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        gu = qlinear(x2[tokens], "gate_up", e)
        h = act(gu[:, :f]) * gu[:, f:]
        y = qlinear(h, "down", e)
        coef = (w * hit)[tokens].sum(dim=1, keepdim=True)
        out[tokens] = out[tokens] + coef * y
    if spec.shared:
        gu = qlinear(x2, "gate_up", -1)
        fs = spec.d_ff_shared
        y = qlinear(act(gu[:, :fs]) * gu[:, fs:], "down", -1)
        if spec.shared == "gated":
            y = torch.sigmoid(x2 @ weights[-1].to(torch.float32).T) * y
        out = out + y
    return out.reshape(shape)


def expert_weight(spec, weights, which, expert):
    """The FP32 weight [N, K] of one expert projection (expert -1: the shared expert)."""
    first = 2 if spec.choice_bias else 1
    if expert < 0:
        base = first + 2 * spec.experts
    else:
        base = first + 2 * expert
    return weights[base + (0 if which == "gate_up" else 1)].detach().to(torch.float32)
