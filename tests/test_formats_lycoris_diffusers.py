"""diffusers LoRA files of DoRA (diffusers 0.42's load_lora_weights loads PEFT's lora_magnitude_vector) and the
kinds it cannot load (LoHa, LoKr, input-axis DoRA): refused in one line naming where they do load."""

import copy

import pytest
import safetensors.torch
import torch

from lora_sd.errors import FormatError
from lora_sd.formats import read_lora, save_lora
from lora_sd.lora_weights import model_module_name
from recipes import convert_lora as convert_recipe
from tests.helpers import fresh_pipeline, max_diff, model_outputs, one_error_line, random_lora
from tests.test_formats_lycoris import CASES, write


def dora_lora(tiny):
    """A random LoRA (3x3 convs included) made DoRA: magnitudes near each layer's row norms, as PEFT keeps them ([out])."""
    lora = random_lora(tiny, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, scale=0.2)
    gen = torch.Generator().manual_seed(1)
    for key, m in lora.modules.items():
        w = layer(tiny, key).weight.detach()
        m.dora_scale = w.flatten(1).norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=gen))
    return lora


def layer(parts, key):
    component, path = key.split(".", 1)
    model = getattr(parts, component)
    return dict(model.named_modules())[model_module_name(component, path, model)]


def merged_parts(tiny, lora):
    """Copies of tiny's U-Net and text encoder with every module merged by LoraModule.merged (our own merge)."""
    parts = copy.copy(tiny)
    parts.unet, parts.text_encoder = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        for key, m in lora.modules.items():
            w = layer(parts, key).weight
            w.copy_(m.merged(w))
    return parts


def test_dora_diffusers_file_loads_in_diffusers_as_our_merge(tiny_sd1, tmp_path):
    lora = dora_lora(tiny_sd1)
    path = save_lora(lora, tmp_path / "dora.safetensors", "diffusers")
    state = safetensors.torch.load_file(str(path))
    magnitudes = [k for k in state if ".lora_magnitude_vector" in k]
    assert len(magnitudes) == len(lora.modules)
    pipe = fresh_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(path))
    merged = merged_parts(tiny_sd1, lora)
    ours = model_outputs(tiny_sd1, merged.unet, merged.text_encoder)
    theirs = model_outputs(tiny_sd1, pipe.unet, pipe.text_encoder)
    base = model_outputs(tiny_sd1)
    assert max_diff(ours, base) > 1e-2  # the DoRA does something
    assert max_diff(ours, theirs) <= 1e-5


def test_dora_diffusers_file_reads_back(tiny_sd1, tmp_path):
    lora = dora_lora(tiny_sd1)
    back = read_lora(save_lora(lora, tmp_path / "dora.safetensors", "diffusers"))[0]
    assert back.modules.keys() == lora.modules.keys()
    for key, m in lora.modules.items():
        b = back.modules[key]
        assert b.dora_scale.shape == (m.dora_scale.shape[0], *[1] * (len(m.weight_shape()) - 1))
        w = layer(tiny_sd1, key).weight.detach()
        assert torch.allclose(b.merged(w), m.merged(w), atol=1e-6)


@pytest.mark.parametrize("case, says", [("loha linear", "is a LoHa"), ("lokr decomposed both", "is a LoKr"),
                                        ("dora input axis", "per-input-column")])
def test_to_diffusers_refuses_what_diffusers_cannot_load(tmp_path, capsys, case, says):
    src = write(tmp_path / "in.safetensors", CASES[case])
    out = tmp_path / "out.safetensors"
    line = one_error_line(convert_recipe, ["--to", "diffusers", src, out], capsys)
    assert says in line and "--to kohya" in line and "--to peft" in line and "ComfyUI" in line
    assert not out.exists()


def test_dora_and_plain_modules_in_one_component_refused(tiny_sd1, tmp_path):
    lora = dora_lora(tiny_sd1)
    next(iter(lora.component("unet").values())).dora_scale = None
    with pytest.raises(FormatError, match="DoRA and plain LoRA modules"):
        save_lora(lora, tmp_path / "out.safetensors", "diffusers")
    assert not (tmp_path / "out.safetensors").exists()
