"""PEFT adapter folders of every kind: written with the names PEFT's save_pretrained uses, loaded by PEFT's own
loader with the formulas' outputs, read back by ours exactly; folders PEFT itself wrote read correctly."""

import copy
import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

from lora_sd.errors import FormatError
from lora_sd.formats.peft import read_peft_folder, write_peft_folder
from lora_sd.lora_weights import LoraWeights
from tests.helpers import model_outputs
from tests.test_peft_kinds import assert_same_weights, build, merged_copy

PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "loha": "LOHA", "loha_tucker": "LOHA", "lokr_full": "LOKR",
              "lokr_decomposed": "LOKR", "lokr_tucker": "LOKR"}


@pytest.mark.parametrize("kind", list(PEFT_TYPES))
def test_peft_loads_our_folders_and_we_read_them_back(tiny_sd1, kind, tmp_path):
    lora = build(kind, tiny_sd1.unet, tiny_sd1.text_encoder)
    write_peft_folder(lora, tmp_path)
    for component in ("unet", "text_encoder"):
        config = json.loads((tmp_path / component / "adapter_config.json").read_text())
        assert config["peft_type"] == PEFT_TYPES[kind] and config.get("use_dora", False) == (kind == "dora")
    assert_same_weights(read_peft_folder(tmp_path), lora)
    unet = PeftModel.from_pretrained(copy.deepcopy(tiny_sd1.unet), str(tmp_path / "unet"))  # PEFT's own loader
    te = PeftModel.from_pretrained(copy.deepcopy(tiny_sd1.text_encoder), str(tmp_path / "text_encoder"))
    got = model_outputs(tiny_sd1, unet, te)
    ref = model_outputs(tiny_sd1, merged_copy(tiny_sd1.unet, "unet", [(lora, 1.0)]),
                        merged_copy(tiny_sd1.text_encoder, "text_encoder", [(lora, 1.0)]))
    for g, r, b in zip(got, ref, model_outputs(tiny_sd1), strict=True):
        assert (r - b).abs().max() > 1e-2 and (g - r).abs().max() <= 1e-5


def test_factors_peft_would_not_make_are_refused(tiny_sd1, tmp_path):
    """LoKr factors split per module as no one PEFT config splits them: one error naming a module, no folder."""
    lora = build("lokr_odd", tiny_sd1.unet)
    with pytest.raises(FormatError, match=r"module unet\.\S+: PEFT's LoKr would shape it .* a PEFT folder cannot hold it"):
        write_peft_folder(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, init_weights=False),
    LoKrConfig(r=8, alpha=2, init_weights=False),  # both factors full: PEFT's alpha / r, baked in when read
    LoKrConfig(r=1, alpha=3, decompose_both=True, decompose_factor=4, init_weights=False),
], ids=["loha-tucker", "lokr-full", "lokr-decomposed-factor4"])
def test_folders_peft_wrote_read_as_peft_computes_them(tiny_sd1, config, tmp_path):
    from lora_sd.targets import target_modules

    config = copy.deepcopy(config)
    config.target_modules = list(target_modules("unet", tiny_sd1.unet, with_conv=True))
    torch.manual_seed(0)
    peft_unet = get_peft_model(copy.deepcopy(tiny_sd1.unet), config)
    peft_unet.save_pretrained(str(tmp_path / "unet"))
    _, want = model_outputs(tiny_sd1, peft_unet)
    lora = read_peft_folder(tmp_path)
    unet = copy.deepcopy(tiny_sd1.unet)
    lora.apply_to(unet=unet)
    _, got = model_outputs(tiny_sd1, unet)
    _, merged = model_outputs(tiny_sd1, merged_copy(tiny_sd1.unet, "unet", [(lora, 1.0)]))
    assert (want - model_outputs(tiny_sd1)[1]).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5 and (merged - want).abs().max() <= 1e-5
    assert_same_weights(LoraWeights.from_peft_models(unet=unet), lora)
