"""The PEFT side of LoraWeights: read adapters of every kind from PEFT layers, and inject LoraWeights as PEFT adapters.

Kinds map to PEFT as: lora -> LoraConfig (DoRA: use_dora=True, magnitude
`lora_magnitude_vector` [out], [1, out, 1, 1] for convs), loha -> LoHaConfig,
lokr -> LoKrConfig; PEFT's LoHa/LoKr parameters carry LyCORIS' names.
Scales: PEFT scales every kind by alpha / r (`set_adapters` too recomputes
weight * alpha / r), so each module gets the r and alpha whose ratio is the
module's scale; a LoKr with both factors full (scale 1 for LyCORIS/ComfyUI)
gets alpha = r, and reading one back bakes PEFT's alpha / r into `lokr_w2`.
"""

import copy
import math
import warnings
from collections import Counter

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, set_peft_model_state_dict
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr.layer import factorization
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from lora_sd import adapter_math
from lora_sd.errors import FormatError, ModelMismatchError
from lora_sd.lora_weights import KIND_NAMES, LoraModule, LoraWeights, fit_to_layer, key_for_module, model_module_name

LORA_PEFT_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude, in its state-dict name


# --- reading ------------------------------------------------------------------------


def from_peft_models(adapter_name="default", **models):
    """LoraWeights of the adapter `adapter_name` in PEFT-adapted models (unet=..., text_encoder=...), every kind.

    Read from the layers rather than `get_peft_model_state_dict`, which picks the
    tensors by the adapter config's one PEFT type: a model can carry the same
    adapter name on LoRA and LoHa/LoKr layers nested in each other.
    """
    lora = LoraWeights()
    for component, model in models.items():
        if model is None:
            continue
        for name, layer in model.named_modules():
            m = module_from_layer(layer, adapter_name)
            if m is not None:  # a layer nested in another (LoHa around LoRA) sits at `<name>.base_layer`
                lora.modules[key_for_module(component, name.replace(".base_layer", ""))] = m
    return lora


def module_from_layer(layer, adapter_name):
    """The LoraModule adapter `adapter_name` holds in one PEFT layer; None when it holds none there."""
    if not isinstance(layer, BaseTunerLayer):
        return None
    shape = tuple(layer.get_base_layer().weight.shape)

    def copy(t):
        return t.detach().clone()

    if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
        tensors = {"lora_down.weight": copy(layer.lora_A[adapter_name].weight),
                   "lora_up.weight": copy(layer.lora_B[adapter_name].weight)}
        dora = None
        if layer.use_dora.get(adapter_name):  # PEFT: [out] (Linear), [1, out, 1, 1] (conv): ours is [out, 1(, 1, 1)]
            dora = copy(layer.lora_magnitude_vector[adapter_name].weight).reshape(shape[0], *[1] * (len(shape) - 1))
        return LoraModule.of_kind("lora", tensors, float(layer.lora_alpha[adapter_name]), dora, shape)
    if isinstance(layer, LycorisLayer) and adapter_name in layer._available_adapters:
        kind = "loha" if isinstance(layer, LoHaLayer) else "lokr"
        tensors = {n: copy(getattr(layer, n)[adapter_name]) for n in layer.adapter_layer_names
                   if adapter_name in getattr(layer, n)}
        alpha = float(layer.alpha[adapter_name])
        if kind == "lokr" and adapter_math.lokr_rank(tensors) is None:
            # PEFT scales a LoKr without a decomposed factor by alpha / r; LyCORIS and ComfyUI by 1 (FORMATS.md)
            tensors["lokr_w2"] = tensors["lokr_w2"] * (alpha / layer.r[adapter_name])
            alpha = 1.0
        return LoraModule.of_kind(kind, tensors, alpha, None, shape)
    return None


# --- configs --------------------------------------------------------------------------


def component_kind(mods: dict, component: str) -> tuple[str, bool]:
    """(kind, DoRA or not) of one component's modules: what one PEFT adapter config can hold. FormatError naming a
    module for what PEFT cannot hold as an adapter (it can still be merged: ops.merge_into_models)."""
    first_key, first = next(iter(mods.items()))
    for key, m in mods.items():
        where = f"{component}.{key}"
        if m.dora_scale is not None and m.kind != "lora":
            raise FormatError(f"module {where} is a {KIND_NAMES[m.kind]} with DoRA, which PEFT has no adapter for; "
                              "merge it into the model instead (generate.py --network_merge, merge_lora.py)")
        if m.dora_scale is not None and adapter_math.dora_axis(m.dora_scale, m.weight_shape()) != "output":
            raise FormatError(f"module {where} is DoRA with a magnitude per input column ([1, in]); PEFT's DoRA is "
                              "per output row: merge it into the model instead (generate.py --network_merge, merge_lora.py)")
        if m.kind != first.kind or (m.dora_scale is None) != (first.dora_scale is None):
            raise FormatError(f"module {component}.{first_key} is {first.label} but {where} is {m.label}: one "
                              "PEFT adapter holds one kind; merge it into the model instead (generate.py --network_merge)")
    return first.kind, first.dora_scale is not None


def peft_rank_alpha(m) -> tuple[int, float]:
    """(r, alpha) to give PEFT for a module: alpha / r is the module's scale, and r makes PEFT create its factors
    (a LoKr with both factors full needs r >= half of each factor's dims; its scale is 1: alpha = r)."""
    if m.kind == "lokr" and m.rank is None:
        w1, w2 = adapter_math.lokr_factors({n: t.to("meta") for n, t in m.tensors.items()})
        r = max(1, math.ceil(max(*w1.shape, *w2.shape[:2]) / 2))
        return r, float(r)
    return m.rank, float(m.alpha)


def lokr_factor(mods: dict) -> int:
    """PEFT's `decompose_factor` that splits every module's dims as its LoKr factors are split (-1, PEFT's and
    LyCORIS' default, when none does: modules PEFT then shapes otherwise are handled by the caller)."""
    candidates = [-1] + sorted({d for m in mods.values() for d in _w1_dims(m)})
    for factor in candidates:
        if all(_w1_dims(m) == (factorization(m.weight_shape()[0], factor)[0],
                               factorization(m.weight_shape()[1], factor)[0]) for m in mods.values()):
            return factor
    return -1


def _w1_dims(m) -> tuple[int, int]:
    t = m.tensors
    return tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])


def peft_config(lora, component: str, model=None):
    """The PEFT config that recreates this component's modules: LoraConfig (use_dora for DoRA), LoHaConfig or
    LoKrConfig, with each module's rank and alpha (rank_pattern / alpha_pattern, PEFT's per-module values)."""
    mods = {model_module_name(component, n, model): m for n, m in lora.component(component).items()}
    if not mods:
        raise ModelMismatchError(f"the LoRA has no modules for the {component}")
    kind, dora = component_kind(lora.component(component), component)
    ranks = {n: peft_rank_alpha(m) for n, m in mods.items()}
    rank = Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks.values()).most_common(1)[0][0]
    common = dict(
        r=rank,
        target_modules=sorted(mods),
        rank_pattern={n: r for n, (r, _) in ranks.items() if r != rank},
        alpha_pattern={n: a for n, (_, a) in ranks.items() if a != alpha},
    )
    if kind == "lora":
        return LoraConfig(lora_alpha=alpha, use_dora=dora, **common)
    tucker = any(n in m.tensors for m in mods.values() for n in ("hada_t1", "lokr_t2"))
    if kind == "loha":
        return LoHaConfig(alpha=alpha, use_effective_conv2d=tucker, **common)
    return LoKrConfig(alpha=alpha, use_effective_conv2d=tucker, decompose_factor=lokr_factor(mods),
                      decompose_both=any("lokr_w1_a" in m.tensors for m in mods.values()), **common)


# --- tensors and injection ---------------------------------------------------------------


def peft_tensors(m) -> dict[str, torch.Tensor]:
    """{PEFT tensor name: tensor} of one module: lora_A/lora_B.weight (+ lora_magnitude_vector, PEFT's shape:
    [out] for a Linear, [1, out, 1, 1] for a conv), or the LyCORIS names PEFT's LoHa/LoKr share."""
    if m.kind != "lora":
        return dict(m.tensors)
    out = {LORA_PEFT_NAMES[n]: t for n, t in m.named_tensors().items()}
    if m.dora_scale is not None:
        out[MAGNITUDE] = m.dora_scale.reshape(-1) if m.up.dim() == 2 else m.dora_scale.reshape(1, -1, 1, 1)
    return out


def peft_state_dict(lora, component: str, model=None) -> dict[str, torch.Tensor]:
    """{`<module>.<PEFT name>`: tensor} in the model's own module names.

    With a model, each module is checked to exist and to fit (`fit_to_layer`)
    and shaped for its layer (SD2 proj_in/proj_out: 2-D or 4-D in files).
    """
    state = {}
    named = dict(model.named_modules()) if model is not None else None
    for name, m in lora.component(component).items():
        mname = model_module_name(component, name, model)
        if named is not None:
            _, m = fit_to_layer(named.get(mname), m, f"{component}.{name}")
        state.update({f"{mname}.{n}": t for n, t in peft_tensors(m).items()})
    return state


def apply_to(lora, adapter_name="default", **models):
    """Inject `lora` (any kind) into models (unet=..., text_encoder=...) as the PEFT adapter `adapter_name`.

    Every module of every component is checked (`plan`) before any model
    changes. Each module's PEFT output is the module's delta (adapter_math) with
    its scale, or DoRA's weight for a DoRA module.
    """
    for component, (fitted, config) in plan(lora, **models).items():
        _inject(models[component], component, fitted, config, adapter_name)


def plan(lora, **models) -> dict:
    """{component: (modules fitted to their layers, PEFT config)}: every check apply_to makes, changing nothing.
    ModelMismatchError / FormatError naming the module that does not fit or that PEFT cannot hold."""
    plans = {}
    for component in lora.components:
        model = models.get(component)
        if model is None:
            raise ModelMismatchError(f"the LoRA has {component} modules but no {component} was given")
        named = dict(model.named_modules())
        fitted = LoraWeights()
        for name, m in lora.component(component).items():
            mname, key = model_module_name(component, name, model), f"{component}.{name}"
            _, fitted.modules[key] = fit_to_layer(named.get(mname), m, key)
            if m.kind == "lora" and isinstance(named[mname], LycorisLayer):
                raise ModelMismatchError(
                    f"module {key} already holds a LoHa/LoKr adapter, which PEFT cannot wrap in a LoRA layer: "
                    "put LoRA and DoRA adapters on a model before LoHa and LoKr ones")
        plans[component] = (fitted, peft_config(fitted, component, model))
    return plans


def _inject(model, component, fitted, config, adapter_name):
    with warnings.catch_warnings():  # PEFT warns on every adapter after a model's first
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter_name)
    named, state = dict(model.named_modules()), {}
    for name, m in fitted.component(component).items():
        mname = model_module_name(component, name, model)
        path, layer = _adapter_layer(named, mname, adapter_name)
        tensors = peft_tensors(m)
        if m.kind != "lora" and _peft_shapes(layer, adapter_name) != {n: tuple(t.shape) for n, t in tensors.items()}:
            _replace_parameters(layer, adapter_name, tensors)
            continue
        state.update({f"{path}.{n}": t for n, t in tensors.items()})
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelMismatchError(f"{component}: could not load {unexpected[0]}")
    if hasattr(model, "set_adapter"):
        model.set_adapter(adapter_name)


def _adapter_layer(named: dict, mname: str, adapter_name):
    """(module path, layer) of the PEFT layer holding `adapter_name` at `mname` (layers of several kinds nest:
    a LoHa layer around a LoRA one has the LoRA at `<mname>.base_layer`)."""
    path, layer = mname, named[mname]
    while isinstance(layer, BaseTunerLayer):
        if _peft_shapes(layer, adapter_name):
            return path, layer
        path, layer = f"{path}.base_layer", layer.base_layer
    raise ModelMismatchError(f"PEFT did not create the adapter {adapter_name!r} on {mname}")


def _peft_shapes(layer, adapter_name) -> dict[str, tuple]:
    """{PEFT tensor name: shape} of what the layer holds for the adapter ({} when nothing)."""
    if isinstance(layer, LoraLayer):
        return {f"{n}.weight": tuple(getattr(layer, n)[adapter_name].weight.shape) for n in ("lora_A", "lora_B")
                if adapter_name in getattr(layer, n)}
    return {n: tuple(getattr(layer, n)[adapter_name].shape) for n in layer.adapter_layer_names
            if adapter_name in getattr(layer, n)}


def _replace_parameters(layer, adapter_name, tensors: dict):
    """Give a LoHa/LoKr layer the module's own tensors for the adapter, in place of what PEFT created.

    PEFT shapes LoKr (and Tucker LoHa) factors from one rank, decompose_factor,
    decompose_both and use_effective_conv2d per config, so a file from another
    trainer can hold, in some modules, factors no config gives (another split,
    a decomposed factor where PEFT keeps it full). PEFT's get_delta_weight only
    asks which of the layer's ParameterDicts hold the adapter, so the file's
    tensors work there as they are; `r` (and so the scale) is already the module's.
    """
    ref = next(getattr(layer, n)[adapter_name] for n in layer.adapter_layer_names if adapter_name in getattr(layer, n))
    for n in layer.adapter_layer_names:
        if adapter_name in getattr(layer, n):
            del getattr(layer, n)[adapter_name]
    for n, t in tensors.items():
        getattr(layer, n)[adapter_name] = torch.nn.Parameter(t.to(ref.device, ref.dtype), requires_grad=ref.requires_grad)


def check_peft_reproduces(lora, component: str, config):
    """FormatError naming the first module whose tensors PEFT, given `config`, would create in other shapes
    (a PEFT folder must load in PEFT itself, where no tensor can be swapped in). Checked on a stand-in model
    of meta-device layers of the modules' weight shapes, so no model is needed."""
    from peft import inject_adapter_in_model

    mods = {model_module_name(component, n): (n, m) for n, m in lora.component(component).items()}
    root = torch.nn.Module()
    for mname, (_, m) in mods.items():
        parent = root
        *path, last = mname.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        shape = m.weight_shape()
        layer = (torch.nn.Linear(shape[1], shape[0], device="meta") if len(shape) == 2
                 else torch.nn.Conv2d(shape[1], shape[0], shape[2:], device="meta"))
        parent.add_module(last, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(copy.deepcopy(config), root, "check")
    named = dict(root.named_modules())
    for mname, (name, m) in mods.items():
        want = {n: tuple(t.shape) for n, t in peft_tensors(m).items() if n != MAGNITUDE}
        got = _peft_shapes(named[mname], "check")
        if got != want:
            raise FormatError(
                f"module {component}.{name}: PEFT's {KIND_NAMES[m.kind]} would shape it {_shapes(got)}, the LoRA has "
                f"{_shapes(want)} (another trainer's factor split); a PEFT folder cannot hold it: write a kohya file "
                "(lora_sd.load_loras_into_pipeline puts that on a pipeline)")


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in sorted(shapes.items()))
