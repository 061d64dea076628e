"""What a module of a LoRA file must be, whatever its kind (FORMATS.md, LyCORIS section).

Files come from other tools and are untrusted. A module with a factor missing, factors that
do not compose, or a `dora_scale` of the wrong length would crash deep inside a merge or, worse,
broadcast into a wrong weight without an error (torch broadcasts [out, 1] against [1, in]).
So every module is checked here, from its tensors' shapes alone, once, for every format:
`module_problem` says what is wrong, in words for a one-line error naming file and module.
"""

import math

from lora_sd import adapter_math
from lora_sd.adapter_math import DORA_SCALE

# what each kind needs; LoKr needs each factor full or decomposed (checked below)
_REQUIRED = {"lora": ("lora_down.weight", "lora_up.weight"),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


def structure_problem(kind, names) -> str | None:
    """What is missing or doubled in a module of `kind` with tensors `names` (alpha/dora_scale aside)."""
    names = set(names) - {"alpha", DORA_SCALE}
    missing = [n for n in _REQUIRED.get(kind, ()) if n not in names]
    if missing:
        return f"has no {missing[0]} (a {kind} module has {', '.join(_REQUIRED[kind])})"
    if kind == "loha" and ("hada_t1" in names) != ("hada_t2" in names):
        return "has only one of hada_t1/hada_t2 (a Tucker LoHa has both cores)"
    if kind == "lokr":
        if "lokr_t2" in names and not {"lokr_w2_a", "lokr_w2_b"} <= names:
            return "has a Tucker core lokr_t2 without its factors lokr_w2_a/lokr_w2_b"
        for i in "12":
            full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
            if full in names and (a in names or b in names):
                return f"has both {full} and {a if a in names else b}: a LoKr factor is either full or decomposed"
            if full not in names and (a in names) != (b in names):
                return f"has {a if a in names else b} without {b if a in names else a}"
            if full not in names and a not in names:
                return f"has no {full} (or {a}/{b})"
    return None


def _dims(t, name, *dims):
    if t[name].dim() not in dims:
        raise ValueError(f"{name} is {t[name].dim()}-D {tuple(t[name].shape)}; expected {' or '.join(map(str, dims))}-D")
    return tuple(t[name].shape)


def _product(t, a, b, what):
    """Shape of `a` @ `b` (2-D each); ValueError when their inner sizes (the rank) disagree."""
    sa, sb = _dims(t, a, 2), _dims(t, b, 2)
    if sa[1] != sb[0]:
        raise ValueError(f"factor ranks disagree: {a} {sa} and {b} {sb} ({what})")
    return sa[0], sb[1], sa[1]


def _tucker(t, core, a, b):
    """Shape of LyCORIS' Tucker rebuild: core [r, r, kh, kw], a [r, out], b [r, in] -> (out, in, kh, kw), rank."""
    sc, sa, sb = _dims(t, core, 4), _dims(t, a, 2), _dims(t, b, 2)
    if not sc[0] == sc[1] == sa[0] == sb[0]:
        raise ValueError(f"factor ranks disagree: {core} {sc}, {a} {sa}, {b} {sb}")
    return (sa[1], sb[1], *sc[2:]), sc[0]


def _loha_shape(t):
    if "hada_t1" in t:
        (s1, r1), (s2, r2) = _tucker(t, "hada_t1", "hada_w1_a", "hada_w1_b"), _tucker(t, "hada_t2", "hada_w2_a", "hada_w2_b")
    else:
        o1, i1, r1 = _product(t, "hada_w1_a", "hada_w1_b", "w1")
        o2, i2, r2 = _product(t, "hada_w2_a", "hada_w2_b", "w2")
        s1, s2 = (o1, i1), (o2, i2)
    if r1 != r2:
        raise ValueError(f"factor ranks disagree: w1 has rank {r1}, w2 rank {r2}")
    if s1 != s2:
        raise ValueError(f"the Hadamard factors differ in shape: w1 {s1}, w2 {s2}")
    return s1


def _lokr_shape(t):
    ranks = []
    if "lokr_w1" in t:
        w1 = _dims(t, "lokr_w1", 2)
    else:
        a, c, r = _product(t, "lokr_w1_a", "lokr_w1_b", "w1")
        w1 = (a, c)
        ranks.append(r)
    if "lokr_w2" in t:
        w2 = _dims(t, "lokr_w2", 2, 4)
    elif "lokr_t2" in t:
        w2, r = _tucker(t, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        ranks.append(r)
    else:
        b, d, r = _product(t, "lokr_w2_a", "lokr_w2_b", "w2")
        w2 = (b, d)
        ranks.append(r)
    if len(ranks) == 2 and ranks[0] != ranks[1]:
        raise ValueError(f"factor ranks disagree: w1 has rank {ranks[0]}, w2 rank {ranks[1]} (consumers take "
                         "the scale from one of them)")
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _lora_shape(t):
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0] or \
            (up.dim() == 4 and up.shape[2:] != (1, 1)):
        raise ValueError(f"has down {tuple(down.shape)}, up {tuple(up.shape)}; a LoRA pair is down [rank, in] or "
                         "[rank, in, k, k] with up [out, rank] or [out, rank, 1, 1]")
    return (up.shape[0], *down.shape[1:])


def delta_shape(kind, tensors) -> tuple:
    """The shape the factors compose to ([out, in*k*k] for flattened convs); ValueError saying why they do not."""
    return {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape}[kind](tensors)


def module_problem(m) -> str | None:
    """What is wrong with LoraModule `m` (every tensor, dora_scale included), or None."""
    tensors = m.named_tensors()
    problem = structure_problem(m.kind, tensors)
    if problem:
        return problem
    all_tensors = {**tensors, **({DORA_SCALE: m.dora_scale} if m.dora_scale is not None else {})}
    for name, t in all_tensors.items():
        if not t.is_floating_point():  # int8 weights are no LoRA we know
            return f"holds {name} as {t.dtype}; a LoRA's tensors are floating point"
        if t.numel() == 0:
            return f"has an empty {name} {tuple(t.shape)}: a LoRA module has rank >= 1"
    try:
        shape = delta_shape(m.kind, tensors)
    except ValueError as e:
        return str(e)
    if m.shape is not None and math.prod(shape) != math.prod(m.shape):
        return f"has factors composing to {shape}, which is no weight of shape {tuple(m.shape)}"
    if m.dora_scale is not None:
        try:
            adapter_math.dora_axis(m.dora_scale, tuple(m.shape or shape))
        except ValueError as e:
            return f"{e} (per output row [out, 1...] or per input column [1, in...])"
        if m.dora_scale.numel() != max(m.dora_scale.shape):  # [1, in, 3, 3] passes dora_axis
            return f"has dora_scale {tuple(m.dora_scale.shape)}: one magnitude per row or column"
    return None
