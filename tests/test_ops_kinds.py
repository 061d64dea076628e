"""Merging LoHa, LoKr and DoRA into a model (ops.merge_into_models, generate's --network_merge): every
weight equals the published formula (tests/kind_formulas.py), module by module, on tiny SD 1.x and 2.x."""

import copy

import pytest
import torch

from lora_sd.errors import ModelMismatchError
from lora_sd.lora_weights import LoraModule, LoraWeights, model_module_name
from lora_sd.ops import merge_into_models
from tests import kind_formulas
from tests.helpers import random_lycoris, random_module

MULTIPLIER = 0.7
CASES = {  # name: (kind, random_module args); rank 2, alpha 1 (scale 1/2, LoKr full/full: 1)
    "loha": ("loha", {}),  # Linear, 1x1 and flattened 3x3 convs (shape recorded, as readers do)
    "loha-no-shape": ("loha", {"set_shape": False}),  # flattened 3x3 convs, kernel known only from the model
    "loha-tucker": ("loha", {"tucker": True}),
    "lokr-full-full": ("lokr", {"lokr": "full"}),
    "lokr-full-w1-decomposed-w2": ("lokr", {"lokr": "w2"}),
    "lokr-decomposed-both": ("lokr", {"lokr": "both"}),
    "lokr-tucker-w2": ("lokr", {"lokr": "w2", "tucker": True}),
    "dora-output-axis": ("lora", {"dora": "output"}),
    "dora-input-axis": ("lora", {"dora": "input"}),
}


def parts(tiny):
    """Copies of tiny's U-Net and text encoder, as merge_into_models takes them."""
    return {"unet": copy.deepcopy(tiny.unet), "text_encoder": copy.deepcopy(tiny.text_encoder)}


def weights(models, lora) -> dict:
    """{LoRA module key: a copy of the model's weight for it}."""
    named = {c: dict(m.named_modules()) for c, m in models.items()}
    out = {}
    for key in lora.modules:
        component, path = key.split(".", 1)
        out[key] = named[component][model_module_name(component, path, models[component])].weight.detach().clone()
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_merge_into_model_equals_the_formula(request, version, case):
    tiny = request.getfixturevalue(f"tiny_{version}")
    kind, args = CASES[case]
    lora = random_lycoris(tiny, kind, rank=2, alpha=1.0, seed=1, **args)
    models = parts(tiny)
    before = weights(models, lora)
    assert merge_into_models([lora], [MULTIPLIER], models) == len(lora.modules)
    after = weights(models, lora)
    convs = 0
    for key, m in lora.modules.items():
        want = kind_formulas.merged_weight(m, before[key], MULTIPLIER)
        assert (after[key] - want).abs().max() <= 1e-5, key
        assert (after[key] - before[key]).abs().max() > 1e-3, key  # the module did change its weight
        convs += before[key].dim() == 4 and before[key].shape[-1] == 3
    assert convs > 0 and any(k.startswith("text_encoder.") for k in lora.modules)


def test_several_kinds_at_their_own_ratios(tiny_sd1):
    """A LoHa, a LoKr and a LoRA merged at once: W + sum_i ratio_i * dW_i."""
    loras = [random_lycoris(tiny_sd1, kind, rank=2, alpha=1.0, seed=i, **args)
             for i, (kind, args) in enumerate([("loha", {}), ("lokr", {"lokr": "w2"}), ("lora", {})])]
    ratios = [0.7, -0.4, 1.3]
    models = parts(tiny_sd1)
    before = weights(models, loras[0])
    merge_into_models(loras, ratios, models)
    after = weights(models, loras[0])
    for key, w in before.items():
        want = w + sum(r * kind_formulas.delta(lora.modules[key], w.shape) for r, lora in zip(ratios, loras))
        assert (after[key] - want).abs().max() <= 1e-5, key


def test_network_merge_in_generate(tiny_sd2):
    """generate's --network_merge puts a LoKr into the pipeline's weights by the same formula."""
    from lora_sd.generate import add_networks
    from tests.helpers import fresh_pipeline

    lora = random_lycoris(tiny_sd2, "lokr", rank=2, alpha=1.0, lokr="both", seed=3)
    pipe = fresh_pipeline(tiny_sd2)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = weights(models, lora)
    add_networks(pipe, [lora], [MULTIPLIER], merge=True)
    after = weights(models, lora)
    for key, m in lora.modules.items():
        assert (after[key] - kind_formulas.merged_weight(m, before[key], MULTIPLIER)).abs().max() <= 1e-5, key


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_fp16_model_merged_in_precision(tiny_sd1, precision):
    """An fp16 model keeps its dtype; the LoHa is added in `precision` (bf16 rounds visibly, float does not)."""
    lora = random_lycoris(tiny_sd1, "loha", rank=2, alpha=1.0, seed=4, components=("unet",))
    models = {"unet": copy.deepcopy(tiny_sd1.unet).half()}
    before = weights(models, lora)
    merge_into_models([lora], [MULTIPLIER], models, precision=precision)
    after = weights(models, lora)
    worst, worst_abs = 0.0, 0.0
    for key, m in lora.modules.items():
        assert after[key].dtype == torch.float16
        w = before[key].float()
        want = kind_formulas.merged_weight(m, w, MULTIPLIER)
        err = (after[key].float() - want).abs()
        worst = max(worst, (err / (want.abs() + 1e-3)).max().item())
        worst_abs = max(worst_abs, err.max().item())
    # float: only fp16 storage rounds (<= 2^-11 relative); bf16 arithmetic rounds visibly more, still small
    if precision == torch.float32:
        assert worst <= 2**-11, worst
    else:
        assert worst > 2**-11 and worst_abs <= 2e-2, (worst, worst_abs)


def _bad(case, tiny):
    """(key, a module that does not fit that key's layer)."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # weight (8, 32)
    if case == "loha-wrong-input-size":
        return key, random_module("loha", (8, 33), set_shape=False)
    if case == "loha-transposed":  # the same number of values, other way round: (32, 8)
        return key, random_module("loha", (32, 8), set_shape=False)
    if case == "lokr-3x3-into-linear":
        return key, random_module("lokr", (8, 32, 3, 3), lokr="w2", tucker=True, set_shape=False)
    if case == "dora-wrong-size":
        m = random_module("lora", (8, 32))
        return key, LoraModule(m.down, m.up, m.alpha, dora_scale=torch.ones(9, 1))
    t = random_module("loha", (8, 32)).tensors  # "loha-ranks-differ": w1_b has rank 3, w1_a rank 2
    t["hada_w1_b"] = torch.randn(3, 32)
    return key, LoraModule.of_kind("loha", t, 1.0)


@pytest.mark.parametrize("case", ["loha-wrong-input-size", "loha-transposed", "lokr-3x3-into-linear",
                                  "dora-wrong-size", "loha-ranks-differ"])
def test_a_module_that_does_not_fit_is_refused_before_any_change(tiny_sd1, case):
    good = random_lycoris(tiny_sd1, "loha", rank=2, seed=5, components=("unet",))
    key, bad = _bad(case, tiny_sd1)
    models = parts(tiny_sd1)
    before = {k: v.clone() for k, v in models["unet"].state_dict().items()}
    with pytest.raises(ModelMismatchError) as e:
        merge_into_models([good, LoraWeights({key: bad})], [1.0, 1.0], models, names=["good.safetensors", "bad.safetensors"])
    message = str(e.value)
    assert message.startswith("bad.safetensors: ") and f" module {key}" in message and "\n" not in message, message
    assert all(torch.equal(v, before[k]) for k, v in models["unet"].state_dict().items())
