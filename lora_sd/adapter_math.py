"""The weight delta of every adapter kind, in pure tensor math (FORMATS.md, LyCORIS section).

Tensors are named as LyCORIS files name them. Each function returns the
delta flattened to [out, in*k*k] unless a 4-D factor fixes the kernel; the
caller reshapes it to the weight's shape. These are the formulas ComfyUI
(`comfy/weight_adapter/{lora,loha,lokr}.py`), AUTOMATIC1111 and LyCORIS
apply, and PEFT's LoHa/LoKr/DoRA layers compute (PEFT's LoKr scale aside:
see `lokr_scale`). Hand-written: PEFT computes these only on live layers,
and the ops here (merge into a checkpoint, SVD merge, conversion) have none.
"""

import torch

KINDS = ("lora", "loha", "lokr")
LORA_TENSORS = ("lora_down.weight", "lora_up.weight")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
TENSOR_NAMES = {"lora": LORA_TENSORS, "loha": LOHA_TENSORS, "lokr": LOKR_TENSORS}
DORA_SCALE = "dora_scale"


def kind_of(names) -> str | None:
    """The kind whose tensor names `names` (a module's tensor names, `alpha`/`dora_scale` aside) are; None when
    they belong to no kind or to several (a file mixing kinds in one module)."""
    names = set(names) - {"alpha", DORA_SCALE}
    kinds = [k for k, allowed in TENSOR_NAMES.items() if names & set(allowed)]
    if len(kinds) != 1 or names - set(TENSOR_NAMES[kinds[0]]):
        return None
    return kinds[0]


def tucker(t, wa, wb):
    """LyCORIS' Tucker (CP) rebuild: core t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb).contiguous()  # torch.kron needs it contiguous


def lora_delta(down, up, scale):
    """up @ down * scale: [out, in*k*k]."""
    return (up.flatten(1) @ down.flatten(1)) * scale


def loha_delta(t: dict, scale):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * scale, or with Tucker cores t1/t2 the rebuilt 4-D factors."""
    if "hada_t1" in t:
        w1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return w1 * w2 * scale


def lokr_factors(t: dict):
    """(w1 [a, c], w2 [b, d] or [b, d, kh, kw]): the full Kronecker factors."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w1, w2


def lokr_delta(t: dict, scale):
    """kron(w1, w2) * scale; w1 gets two unit dims for a 4-D w2."""
    w1, w2 = lokr_factors(t)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * scale  # torch.kron fails on a non-contiguous w2 (Tucker's einsum)


def lokr_rank(t: dict) -> int | None:
    """The rank of LoKr's decomposed factor (w2's first, as ComfyUI reads it); None when both are full."""
    if "lokr_w2_b" in t:
        return t["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in t:
        return t["lokr_w1_b"].shape[0]
    return None


def lokr_scale(t: dict, alpha) -> float:
    """LyCORIS/ComfyUI's LoKr scale: alpha / rank of the decomposed factor, and 1 when no factor is decomposed
    (alpha then has no effect: PEFT, which always scales by alpha / r, disagrees there)."""
    rank = lokr_rank(t)
    return 1.0 if rank is None or alpha is None else alpha / rank


def kind_rank(kind: str, t: dict) -> int | None:
    if kind == "lora":
        return t["lora_down.weight"].shape[0]
    if kind == "loha":
        return t["hada_w1_b"].shape[0]
    return lokr_rank(t)


def kind_scale(kind: str, t: dict, alpha) -> float:
    if kind == "lokr":
        return lokr_scale(t, alpha)
    rank = kind_rank(kind, t)
    return 1.0 if alpha is None else alpha / rank


def delta(kind: str, t: dict, alpha, shape=None):
    """The weight delta of one module; reshaped to `shape` (the weight's) when given."""
    scale = kind_scale(kind, t, alpha)
    if kind == "lora":
        d = lora_delta(t["lora_down.weight"], t["lora_up.weight"], scale)
    elif kind == "loha":
        d = loha_delta(t, scale)
    elif kind == "lokr":
        d = lokr_delta(t, scale)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    return d.reshape(shape) if shape is not None else d


def _thin(w):
    """(u, v) with u @ v = w [a, c] and inner size min(a, c)."""
    a, c = w.shape
    return (torch.eye(a, dtype=w.dtype, device=w.device), w) if a <= c else (w, torch.eye(c, dtype=w.dtype, device=w.device))


def _tucker_factors(t, wa, wb):
    """(wa.T [out, r], [r, in*k*k]) whose product is tucker(t, wa, wb) flattened."""
    return wa.T, torch.einsum("i j k l, j q -> i q k l", t, wb).flatten(1)


def delta_factors(kind: str, t: dict, alpha):
    """(up [out, k], down [k, in*k*k]) with up @ down = delta(kind, t, alpha) flattened, k small where the kind
    allows: LoHa's Hadamard product of two rank-r products is the product of their row- and column-wise
    Kronecker products (k = r1 * r2), a LoKr's Kronecker product the product of its factors' Kronecker
    products (the mixed-product rule). SVD merge uses them to stay exact without forming the delta."""
    scale = kind_scale(kind, t, alpha)
    if kind == "lora":
        return t["lora_up.weight"].flatten(1) * scale, t["lora_down.weight"].flatten(1)
    if kind == "loha":
        if "hada_t1" in t:
            (a1, b1), (a2, b2) = (_tucker_factors(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]),
                                  _tucker_factors(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]))
        else:
            a1, b1, a2, b2 = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [out, r1 * r2]
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1 * r2, n]
        return up * scale, down
    if kind != "lokr":
        raise ValueError(f"unknown adapter kind {kind!r}")
    u1, v1 = (t["lokr_w1_a"], t["lokr_w1_b"]) if "lokr_w1_a" in t else _thin(t["lokr_w1"])
    if "lokr_w2" in t:
        u2, v2 = _thin(t["lokr_w2"].flatten(1))
    elif "lokr_t2" in t:
        u2, v2 = _tucker_factors(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        u2, v2 = t["lokr_w2_a"], t["lokr_w2_b"]
    # torch.kron fails on non-contiguous inputs (transposes, Tucker einsums)
    return torch.kron(u1.contiguous(), u2.contiguous()) * scale, torch.kron(v1.contiguous(), v2.contiguous())


def dora_axis(dora_scale, weight_shape) -> str:
    """'output' ([out, 1...], PEFT's and LyCORIS' default) or 'input' ([1, in...]): how the magnitude is laid out."""
    out = weight_shape[0]
    if dora_scale.shape[0] == out and dora_scale[0].numel() == 1:
        return "output"
    if dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.shape[1] == weight_shape[1]:
        return "input"
    raise ValueError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither axis of a weight {tuple(weight_shape)}")


def dora_weight(weight, delta_w, dora_scale):
    """DoRA's new weight: W' = m * (W + dW) / ||W + dW||, the norm per output row (m [out, 1...]) or per
    input column (m [1, in...]), as ComfyUI's weight_decompose and PEFT's (output-axis) DoRA compute it."""
    combined = weight + delta_w.reshape(weight.shape)
    if dora_axis(dora_scale, weight.shape) == "output":
        norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        return combined * (dora_scale.reshape(norm.shape) / norm)
    cols = combined.transpose(0, 1).flatten(1).norm(dim=1)  # per input channel
    norm = cols.reshape(1, -1, *[1] * (weight.dim() - 2))
    return combined * (dora_scale.reshape(norm.shape) / norm)


def weight_norm_output(weight):
    """||W|| per output row, shaped [out, 1, ...]: the magnitude DoRA starts from (LyCORIS' dora_scale)."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
