"""The weight each adapter kind gives, written out from the published definitions (FORMATS.md, LyCORIS
section: LyCORIS' and ComfyUI's loha.py / lokr.py, the DoRA paper) for tests to compare our ops with.

Deliberately not `lora_sd.adapter_math`: these are the references it is checked against.
"""

import torch


def tucker_rebuild(core, wa, wb):
    """LyCORIS' rebuild_tucker: W[p, q, k, l] = sum_ij core[i, j, k, l] * wa[i, p] * wb[j, q]."""
    return (wa.T @ (core.permute(2, 3, 0, 1) @ wb)).permute(2, 3, 0, 1)


def kron(w1, w2):
    """Kronecker product, block (i, k) of the result = w1[i, k] * w2 (a 4-D w2 keeps its kernel)."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    return torch.einsum("ac,bd...->abcd...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])


def lora_delta(t, alpha, shape):
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    return (up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])).reshape(shape)


def loha_delta(t, alpha, shape):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, r = hada_w1_b's rows; Tucker: each factor rebuilt."""
    if "hada_t1" in t:
        w1 = tucker_rebuild(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = tucker_rebuild(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2 * (alpha / t["hada_w1_b"].shape[0])).reshape(shape)


def lokr_delta(t, alpha, shape):
    """kron(w1, w2) * alpha / dim, dim = the decomposed factor's rank (w2's first); times 1 when both are full."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker_rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return (kron(w1, w2) * (alpha / dim if dim else 1.0)).reshape(shape)


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}


def delta(m, shape):
    """The module's weight delta, shaped `shape`."""
    return DELTAS[m.kind](m.named_tensors(), m.alpha, shape)


def merged_weight(m, weight, strength):
    """W + s * dW, or for DoRA W + s * (m * V / ||V|| - W) with V = W + dW and the norm per output row
    (dora_scale [out, 1...]) or per input column ([1, in...]): ComfyUI's strength rule."""
    d = delta(m, weight.shape)
    if m.dora_scale is None:
        return weight + strength * d
    v = weight + d
    per_output = m.dora_scale.shape[0] == weight.shape[0] and m.dora_scale.shape[1] == 1
    dims = tuple(range(1, v.dim())) if per_output else (0, *range(2, v.dim()))
    norm = v.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return weight + strength * (m.dora_scale.reshape(norm.shape) * v / norm - weight)
