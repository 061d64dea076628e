"""LoRA files as diffusers' own training scripts write them, old names included, and diffusers LoRA folders.

Each file is built here with the names diffusers' code gives (its converters and
tables), read with `read_lora`, and compared module by module with the deltas
diffusers itself applies when it loads the same file into a tiny pipeline.
"""

import copy

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS,
                                              convert_state_dict_to_diffusers)
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from lora_sd.errors import FormatError
from lora_sd.formats import read_lora, save_lora
from lora_sd.lora_weights import key_for_module
from tests.helpers import fresh_pipeline

RANK = 4
N_MODULES = {"unet": 32, "text_encoder": 12}  # the tiny U-Net's 8 attentions x 4 projections; 3 CLIP layers x 4


@pytest.fixture(scope="module")
def trained(tiny_sd1):
    """U-Net and text encoder with random LoRAs on the modules diffusers' train_dreambooth_lora.py adapts
    (its LoraConfig: r = lora_alpha = rank; attention projections only)."""
    unet, te = copy.deepcopy(tiny_sd1.unet), copy.deepcopy(tiny_sd1.text_encoder)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, te):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(te)


def _rename(state, table):
    """PEFT names -> the older names that `table` (one of diffusers' renaming tables) maps to PEFT's."""
    out = {}
    for key, t in state.items():
        for old, new in table.items():
            if new + ".weight" in key:
                key = key.replace(new, old)
                break
        out[key] = t
    return out


def _with_text_model(state):
    """The text-encoder names as transformers 4 (the stack these files were written on) spelled them."""
    return {"text_model." + k: t for k, t in state.items()}


def layout(name, unet_sd, te_sd):
    """{key: tensor} of a LoRA file in one of the layouts diffusers' training scripts wrote."""
    if name == "today":  # train_dreambooth_lora.py today: convert_state_dict_to_diffusers(get_peft_model_state_dict(..))
        unet, te = convert_state_dict_to_diffusers(unet_sd), convert_state_dict_to_diffusers(_with_text_model(te_sd))
    elif name == "attn_procs":  # 0.12-0.16: LoRAAttnProcessor's to_q_lora.down/up under `.processor`
        unet = _rename(unet_sd, {k: v for k, v in UNET_TO_DIFFUSERS.items() if "_lora" in k})
        unet = {k.replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor."): t
                for k, t in unet.items()}
        te = _rename(_with_text_model(te_sd), DIFFUSERS_OLD_TO_PEFT)  # self_attn.to_q_lora.down.weight
    assert all(".lora_A." not in k and ".lora_B." not in k for k in [*unet, *te])  # nothing left in PEFT names
    return {**{f"unet.{k}": t for k, t in unet.items()}, **{f"text_encoder.{k}": t for k, t in te.items()}}


def diffusers_deltas(pipe):
    """{LoraWeights key: delta W} of every LoRA layer diffusers injected."""
    deltas = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and module.lora_A:
                (adapter,) = module.lora_A
                deltas[key_for_module(component, name)] = module.get_delta_weight(adapter)
    return deltas


def assert_same_deltas(lora, reference, components=("unet", "text_encoder")):
    assert set(lora.modules) == set(reference) and len(reference) == sum(N_MODULES[c] for c in components)
    for key, m in lora.modules.items():
        assert reference[key].abs().max() > 1e-3, key  # not a zero LoRA
        assert torch.allclose(m.delta(), reference[key], atol=1e-6), key


@pytest.mark.parametrize("name", ["today", "attn_procs"])
def test_files_of_diffusers_training_scripts(tiny_sd1, trained, tmp_path, name):
    state = layout(name, *trained)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    safetensors.torch.save_file(state, path)
    pipe = fresh_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(path))
    lora, fmt = read_lora(path)
    assert fmt == "diffusers" and all(m.alpha == RANK for m in lora.modules.values())
    assert_same_deltas(lora, diffusers_deltas(pipe))


def test_save_attn_procs_file_without_the_unet_prefix(tiny_sd1, trained, tmp_path):
    """`unet.save_attn_procs` wrote the U-Net alone, keys without `unet.`; diffusers loads it with prefix=None."""
    state = {k.removeprefix("unet."): t for k, t in layout("attn_procs", *trained).items() if k.startswith("unet.")}
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(state, path)
    pipe = fresh_pipeline(tiny_sd1)
    pipe.unet.load_lora_adapter(state, prefix=None)
    lora, _ = read_lora(path)
    assert_same_deltas(lora, diffusers_deltas(pipe), ["unet"])


def test_network_alphas_stored_as_alpha_keys(tiny_sd1, trained, tmp_path):
    """`.alpha` tensors named as diffusers names its network_alphas (`_get_alpha_name`): read as the alphas
    diffusers' load_lora_into_unet / load_lora_into_text_encoder apply when given them."""
    state = layout("today", *trained)
    alphas = {}
    for key in state:
        if key.endswith(".down.weight"):
            module = key.split(".lora.")[0] if ".lora." in key else key  # _get_alpha_name's naming
            alphas[module + ".alpha"] = 1.0  # alpha 1, rank 4: a quarter of the scale of alpha = rank
    path = tmp_path / "with_alphas.safetensors"
    safetensors.torch.save_file({**state, **{k: torch.tensor(v) for k, v in alphas.items()}}, path)
    pipe = fresh_pipeline(tiny_sd1)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, pipe.unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, pipe.text_encoder)
    lora, _ = read_lora(path)
    assert all(m.alpha == 1.0 for m in lora.modules.values())
    assert_same_deltas(lora, diffusers_deltas(pipe))


@pytest.mark.parametrize("weights", ["pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"])
def test_diffusers_lora_folder_is_read_as_its_file(tiny_sd1, trained, tmp_path, weights):
    """What `save_model_as = "diffusers"` and `save_lora_weights(folder)` write, read as `load_lora_weights(folder)`."""
    folder = tmp_path / "lora"
    unet_sd, te_sd = trained
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                              safe_serialization=weights.endswith(".safetensors"))
    assert [p.name for p in folder.iterdir()] == [weights]
    pipe = fresh_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(folder))
    lora, fmt = read_lora(folder)
    assert fmt == "diffusers"
    assert_same_deltas(lora, diffusers_deltas(pipe))


def test_folders_that_are_no_lora(tiny_sd1, trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match=f"^{empty}: a folder, but neither a PEFT adapter folder .* nor a diffusers "
                                          "LoRA folder \\(pytorch_lora_weights.safetensors or pytorch_lora_weights.bin\\)$"):
        read_lora(empty)
    both = tmp_path / "both"
    source = tmp_path / "src.safetensors"
    safetensors.torch.save_file(layout("today", *trained), source)
    lora, _ = read_lora(source)
    save_lora(lora, both, "peft")
    save_lora(lora, both / "pytorch_lora_weights.safetensors", "diffusers")
    with pytest.raises(FormatError, match=f"^{both}: holds both PEFT adapter folders and pytorch_lora_weights"):
        read_lora(both)

