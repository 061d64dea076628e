"""Every adapter kind as a PEFT adapter: apply_to gives the model the published formulas give, from_peft_models
reads back exactly what was applied, several kinds weight as set_adapters says.

The reference weights are computed here from the published definitions
(LyCORIS / ComfyUI: FORMATS.md's LyCORIS section), not with lora_sd.adapter_math.
"""

import copy
import re

import pytest
import torch
from peft.tuners.lokr.layer import factorization

from lora_sd.errors import FormatError, ModelMismatchError
from lora_sd.lora_weights import LoraModule, LoraWeights, key_for_module
from lora_sd.targets import target_modules
from tests.helpers import fresh_pipeline, model_outputs

KINDS = ["lora", "dora", "loha", "loha_tucker", "lokr_full", "lokr_decomposed", "lokr_tucker", "lokr_odd"]


# --- builders: LyCORIS-shaped random modules on the tiny models' targets ----------------------


def _rand(gen, *shape, scale=0.3):
    return torch.randn(shape, generator=gen) * scale


def lora_module(gen, w, rank=2, alpha=1.0):
    out, inp = w.shape[:2]
    kernel = tuple(w.shape[2:])
    return LoraModule(_rand(gen, rank, inp, *kernel), _rand(gen, out, rank, *[1] * len(kernel)), alpha)


def dora_module(gen, w, rank=2, alpha=1.0):
    m = lora_module(gen, w, rank, alpha)
    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    m.dora_scale = norm * (1 + torch.rand(norm.shape, generator=gen))
    return m


def loha_module(gen, w, rank=2, alpha=1.5, tucker=False):
    out, inp = w.shape[:2]
    if tucker and w.dim() == 4 and w.shape[2:] != (1, 1):
        t = {f"hada_t{i}": _rand(gen, rank, rank, *w.shape[2:]) for i in (1, 2)}
        t |= {f"hada_w{i}_a": _rand(gen, rank, out) for i in (1, 2)}
        t |= {f"hada_w{i}_b": _rand(gen, rank, inp) for i in (1, 2)}
    else:
        flat = w[0].numel()
        t = {f"hada_w{i}_a": _rand(gen, out, rank) for i in (1, 2)} | {f"hada_w{i}_b": _rand(gen, rank, flat) for i in (1, 2)}
    return LoraModule.of_kind("loha", t, alpha, shape=tuple(w.shape))


def lokr_module(gen, w, rank=None, alpha=2.0, factor=-1, decompose_both=False, rule=True, tucker=False):
    """LyCORIS' LoKr: w1 [a, c], w2 [b, d(, k, k)]; with `rule` a factor is decomposed at `rank` where LyCORIS
    (and PEFT) would (w1 only with decompose_both), else w2 always is. rank None: both full (alpha 1.0, unused)."""
    out, inp = w.shape[:2]
    (a, b), (c, d) = factorization(out, factor), factorization(inp, factor)
    kernel = tuple(w.shape[2:])
    if rank is not None and rule and rank >= max(b, d) / 2:
        rank = None
    t = {}
    if decompose_both and rank is not None and rank < max(a, c) / 2:
        t["lokr_w1_a"], t["lokr_w1_b"] = _rand(gen, a, rank), _rand(gen, rank, c)
    else:
        t["lokr_w1"] = _rand(gen, a, c)
    if rank is None:
        t["lokr_w2"] = _rand(gen, b, d, *kernel)
        alpha = 1.0
    elif tucker and kernel not in ((), (1, 1)):
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = _rand(gen, rank, rank, *kernel), _rand(gen, rank, b), _rand(gen, rank, d)
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = _rand(gen, b, rank), _rand(gen, rank, d * (w[0, 0].numel()))
    return LoraModule.of_kind("lokr", t, alpha, shape=tuple(w.shape))


def build(kind, unet, text_encoder=None, seed=0, text_encoder_2=None) -> LoraWeights:
    """A LoraWeights of `kind` on every sd-scripts target of the U-Net (3x3 convs included) and, when given,
    the text encoder(s)."""
    gen = torch.Generator().manual_seed(seed)
    lora = LoraWeights()
    parts = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for component, model in parts.items():
        if model is None:
            continue
        named = dict(model.named_modules())
        for i, name in enumerate(target_modules(component, model, with_conv=component == "unet")):
            w = named[name].weight.detach()
            if kind == "lora":
                m = lora_module(gen, w)
            elif kind == "dora":
                m = dora_module(gen, w)
            elif kind.startswith("loha"):
                m = loha_module(gen, w, tucker=kind == "loha_tucker")
            elif kind == "lokr_full":
                m = lokr_module(gen, w)
            elif kind == "lokr_decomposed":
                m = lokr_module(gen, w, rank=1, decompose_both=True)
            elif kind == "lokr_tucker":
                m = lokr_module(gen, w, rank=1, tucker=True)
            else:  # lokr_odd: per module, factor splits and decompositions no one PEFT config gives
                m = lokr_module(gen, w, rank=2 if i % 3 == 0 else None, factor=[-1, 4, 2][i % 3], rule=False)
            lora.modules[key_for_module(component, name)] = m
    return lora


# --- the published formulas -------------------------------------------------------------------


def cp(t, wa, wb):
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def formula_delta(m: LoraModule, shape):
    """delta W from the definitions: LoRA up @ down * alpha / r; LoHa (w1a @ w1b) * (w2a @ w2b) * alpha / r
    (Tucker: CP rebuilds); LoKr kron(w1, w2) * alpha / rank of a decomposed factor (w2's first; 1 when none)."""
    t = m.tensors
    if m.kind == "lora":
        d = m.up.flatten(1) @ m.down.flatten(1) * (m.alpha / m.down.shape[0])
    elif m.kind == "loha":
        if "hada_t1" in t:
            w1, w2 = cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]), cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        d = w1 * w2 * (m.alpha / t["hada_w1_b"].shape[0])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_t2" in t:
            w2 = cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        decomposed = t.get("lokr_w2_b", t.get("lokr_w1_b"))  # ComfyUI: w2's rank, else w1's
        scale = m.alpha / decomposed.shape[0] if decomposed is not None else 1.0
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2) * scale
    return d.reshape(shape)


def formula_weight(m: LoraModule, w, multiplier=1.0):
    d = formula_delta(m, w.shape)
    if m.dora_scale is None:
        return w + multiplier * d
    combined = w + d
    norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    return w + multiplier * (m.dora_scale * combined / norm - w)


def merged_copy(model, component, loras_and_weights):
    """A copy of `model` with each module's weight replaced by the formulas' result."""
    model = copy.deepcopy(model)
    named = dict(model.named_modules())
    with torch.no_grad():
        for lora, mult in loras_and_weights:
            for name, m in lora.component(component).items():
                layer = named[name.removeprefix("text_model.") if not hasattr(model, "text_model") else name]
                layer.weight.copy_(formula_weight(m, layer.weight, mult))
    return model


def assert_same_weights(a: LoraWeights, b: LoraWeights):
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        n = b.modules[k]
        assert (m.kind, m.alpha) == (n.kind, n.alpha), k
        ta, tb = m.named_tensors(), n.named_tensors()
        assert ta.keys() == tb.keys(), k
        assert all(torch.equal(ta[x].reshape(tb[x].shape), tb[x]) for x in ta), k
        assert (m.dora_scale is None) == (n.dora_scale is None), k
        assert m.dora_scale is None or torch.equal(m.dora_scale, n.dora_scale), k


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_apply_to_gives_the_formulas_model(tiny, kind):
    """Applied as a PEFT adapter, each kind changes the U-Net (and text encoder) of SD 1.x and 2.x exactly as
    its formula merged into the weights does."""
    lora = build(kind, tiny.unet, tiny.text_encoder)
    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    lora.apply_to(unet=unet, text_encoder=te)
    got = model_outputs(tiny, unet, te)
    ref = model_outputs(tiny, merged_copy(tiny.unet, "unet", [(lora, 1.0)]),
                        merged_copy(tiny.text_encoder, "text_encoder", [(lora, 1.0)]))
    for g, r, b in zip(got, ref, model_outputs(tiny), strict=True):
        assert (r - b).abs().max() > 1e-2  # the adapter does change the outputs
        assert (g - r).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["dora", "loha_tucker", "lokr_odd"])
def test_apply_to_on_sdxl_gives_the_formulas_model(kind):
    """SDXL: both text encoders (text_encoder_2 keeps `text_model.` in its module names) and the U-Net."""
    from lora_sd.tiny import build_tiny_sd
    from tests.test_sdxl_formats import outputs

    xl = build_tiny_sd("sdxl")
    parts = {"unet": xl.unet, "text_encoder": xl.text_encoder, "text_encoder_2": xl.text_encoder_2}
    lora = build(kind, xl.unet, xl.text_encoder, text_encoder_2=xl.text_encoder_2)
    adapted = {n: copy.deepcopy(m) for n, m in parts.items()}
    lora.apply_to(**adapted)
    merged = {n: merged_copy(m, n, [(lora, 1.0)]) for n, m in parts.items()}

    def run(p):
        return outputs(p["unet"], p["text_encoder"], p["text_encoder_2"], xl.tokenizer, xl.tokenizer_2)

    for g, r, b in zip(run(adapted), run(merged), run(parts), strict=True):
        assert (r - b).abs().max() > 1e-2 and (g - r).abs().max() <= 1e-5
    assert_same_weights(LoraWeights.from_peft_models(**adapted), lora)


@pytest.mark.parametrize("kind", KINDS)
def test_from_peft_models_reads_back_what_was_applied(tiny_sd1, kind):
    lora = build(kind, tiny_sd1.unet, tiny_sd1.text_encoder)
    unet, te = copy.deepcopy(tiny_sd1.unet), copy.deepcopy(tiny_sd1.text_encoder)
    lora.apply_to(unet=unet, text_encoder=te, adapter_name="x")
    back = LoraWeights.from_peft_models("x", unet=unet, text_encoder=te)
    assert_same_weights(back, lora)
    assert all(m.shape is not None for m in back.modules.values())


def test_peft_lokr_with_full_factors_reads_with_its_scale_baked_in(tiny_sd1):
    """PEFT scales a LoKr by alpha / r even when no factor is decomposed; LyCORIS and ComfyUI by 1: reading it,
    alpha / r goes into lokr_w2 (FORMATS.md's LoKr trap)."""
    from peft import LoKrConfig

    unet = copy.deepcopy(tiny_sd1.unet)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    unet.add_adapter(LoKrConfig(r=8, alpha=2, target_modules=[name], init_weights=False))
    layer = dict(unet.named_modules())[name]
    assert "default" in layer.lokr_w2 and layer.scaling["default"] == 0.25  # both factors full, PEFT scale 2/8
    m = LoraWeights.from_peft_models(unet=unet).modules[f"unet.{name}"]
    assert m.alpha == 1.0 and m.rank is None
    assert torch.allclose(formula_delta(m, layer.get_base_layer().weight.shape), layer.get_delta_weight("default"), atol=1e-7)


def test_two_kinds_weighted_on_the_same_modules(tiny_sd1):
    """A LoRA, a LoHa and a LoKr on the same layers (PEFT nests the LoHa/LoKr layers around the LoRA one),
    weighted 0.7 / 0.3 / 0.5 by set_adapters: W + 0.7 dW1 + 0.3 dW2 + 0.5 dW3."""
    loras = [build("lora", tiny_sd1.unet, seed=1), build("loha_tucker", tiny_sd1.unet, seed=2),
             build("lokr_odd", tiny_sd1.unet, seed=3)]
    pipe = fresh_pipeline(tiny_sd1)
    for i, lora in enumerate(loras):
        lora.apply_to(unet=pipe.unet, adapter_name=f"a{i}")
    pipe.set_adapters(["a0", "a1", "a2"], adapter_weights=[0.7, 0.3, 0.5])
    _, got = model_outputs(tiny_sd1, pipe.unet)
    _, ref = model_outputs(tiny_sd1, merged_copy(tiny_sd1.unet, "unet", zip(loras, [0.7, 0.3, 0.5])))
    assert (got - ref).abs().max() <= 1e-5
    back = [LoraWeights.from_peft_models(f"a{i}", unet=pipe.unet) for i in range(3)]
    for b, lora in zip(back, loras, strict=True):
        assert_same_weights(b, lora)


def _one(kind_module, tiny, name="down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", **kw):
    w = dict(tiny.unet.named_modules())[name].weight.detach()
    return f"unet.{name}", kind_module(torch.Generator().manual_seed(0), w, **kw)


@pytest.mark.parametrize("case", ["input-axis-dora", "loha-dora", "mixed-kinds", "misfit", "lora-around-loha"])
def test_what_peft_cannot_hold_is_refused_before_any_change(tiny_sd1, case):
    unet = copy.deepcopy(tiny_sd1.unet)
    key, m = _one(lora_module, tiny_sd1)
    lora = LoraWeights({key: m})
    error, words = FormatError, key
    if case == "input-axis-dora":
        m.dora_scale = torch.rand(1, m.down.shape[1])
        words = "per input column"
    elif case == "loha-dora":
        key, m = _one(loha_module, tiny_sd1)
        m.dora_scale = torch.rand(m.shape[0], 1)
        lora = LoraWeights({key: m})
        words = "LoHa with DoRA"
    elif case == "mixed-kinds":
        lora.modules.update([_one(loha_module, tiny_sd1, "down_blocks.0.attentions.0.proj_in")])
    elif case == "misfit":
        lora.modules.update([_one(loha_module, tiny_sd1, "down_blocks.0.attentions.0.proj_in")])
        lora = LoraWeights({k: v for k, v in lora.modules.items() if v.kind == "loha"})
        key = next(iter(lora.modules))
        t = lora.modules[key].tensors
        t["hada_w1_b"], t["hada_w2_b"] = torch.rand(2, 16), torch.rand(2, 16)  # a delta [8, 16] for an [8, 8] weight
        error, words = ModelMismatchError, f"{key} does not fit the model: its delta is (8, 16)"
    elif case == "lora-around-loha":
        LoraWeights(dict([_one(loha_module, tiny_sd1)])).apply_to(unet=unet, adapter_name="first")
        error, words = ModelMismatchError, "before LoHa and LoKr"
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(error, match=re.escape(words)):
        lora.apply_to(unet=unet, adapter_name="x")
    assert unet.state_dict().keys() == before.keys() and "x" not in getattr(unet, "peft_config", {})
