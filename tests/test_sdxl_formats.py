"""SDXL LoRA files: sd-scripts' names (original-layout U-Net, lora_te1_/lora_te2_), metadata, and loading
in diffusers' StableDiffusionXLPipeline; the block map checked against diffusers' own converter."""

import copy

import pytest
import safetensors
import safetensors.torch
import torch

from lora_sd.errors import FormatError
from lora_sd.formats import load_lora, read_lora, save_lora
from lora_sd.formats.sdxl_names import SgmNames
from lora_sd.lora_weights import LoraWeights
from lora_sd.targets import NetworkSpec, lora_configs
from tests.helpers import add_random_adapters

PARTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl():
    from lora_sd.tiny import build_tiny_sd

    return build_tiny_sd("sdxl")


def adapted_sdxl(model, conv_dim=2, seed=0, scale=0.1):
    """(LoraWeights, {part: adapted copy}) with random LoRA weights on all three parts, conv_dim included."""
    models = {p: copy.deepcopy(getattr(model, p)) for p in PARTS}
    configs = lora_configs(models["unet"], models["text_encoder"], NetworkSpec(4, 2, conv_dim, 1),
                           text_encoder_2=models["text_encoder_2"])
    assert set(configs) == set(PARTS)
    return add_random_adapters(models, configs, seed, scale), models


def outputs(unet, te1, te2, tokenizer, tokenizer_2):
    """(te1 hidden states, te2 hidden states, te2 text_embeds, U-Net output with text_time conditioning)."""
    with torch.no_grad():
        ids1 = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids2 = tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 8, 8, generator=gen)
        context = torch.cat([h1, h2], dim=-1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out = unet(latents, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return h1, h2, pooled, out


def expected_kohya_names(model):
    """sd-scripts' targets on the tiny SDXL, named by FORMATS.md's block map, written out from the rules:
    levels [DownBlock2D, CrossAttnDownBlock2D (depth 2)], layers_per_block 2 (3 blocks a level)."""
    names = []
    for prefix, te in (("lora_te1_", model.text_encoder), ("lora_te2_", model.text_encoder_2)):
        for i in range(te.config.num_hidden_layers):
            layer = f"{prefix}text_model_encoder_layers_{i}_"
            names += [layer + f"self_attn_{p}_proj" for p in "qkvo"[:3]] + [layer + "self_attn_out_proj"]
            names += [layer + "mlp_fc1", layer + "mlp_fc2"]
    # attentions: input_blocks 4, 5 (level 1), middle_block 1, output_blocks 0-2 (up level 0); depth 2 each
    for block in ("input_blocks_4_1", "input_blocks_5_1", "middle_block_1", "output_blocks_0_1",
                  "output_blocks_1_1", "output_blocks_2_1"):
        names += [f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"]
        for k in range(2):
            tb = f"lora_unet_{block}_transformer_blocks_{k}_"
            names += [tb + f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
            names += [tb + "ff_net_0_proj", tb + "ff_net_2"]
    # conv_dim: resnets (skip_connection where channels change: 8 -> 16 at input_blocks 4, every output block
    # as its input is concatenated with a skip), the downsampler and the upsampler
    resnets = {"input_blocks_1_0": False, "input_blocks_2_0": False, "input_blocks_4_0": True,
               "input_blocks_5_0": False, "middle_block_0": False, "middle_block_2": False,
               **{f"output_blocks_{n}_0": True for n in range(6)}}
    for block, skip in resnets.items():
        names += [f"lora_unet_{block}_{n}" for n in ("in_layers_2", "emb_layers_1", "out_layers_3")]
        names += [f"lora_unet_{block}_skip_connection"] * skip
    names += ["lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"]
    return names


def test_kohya_names_are_sd_scripts_sdxl_names(sdxl, tmp_path):
    lora, _ = adapted_sdxl(sdxl)
    state = safetensors.torch.load_file(save_lora(lora, tmp_path / "x.safetensors", version="sdxl"))
    written = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state})
    expected = sorted(expected_kohya_names(sdxl))
    assert len(expected) == len(set(expected))
    assert written == expected


def test_sdxl_metadata_as_sd_scripts(sdxl, tmp_path):
    lora, _ = adapted_sdxl(sdxl)
    path = save_lora(lora, tmp_path / "x.safetensors", version="sdxl")
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024"
    # the file says SDXL even when the caller does not: text_encoder_2 modules are SDXL's
    path2 = save_lora(LoraWeights(lora.modules), tmp_path / "y.safetensors")
    with safetensors.safe_open(str(path2), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_sdxl_pipeline_loads_our_file(sdxl, tmp_path, fmt):
    """diffusers' StableDiffusionXLPipeline.load_lora_weights reproduces the adapted model (float32)."""
    lora, models = adapted_sdxl(sdxl)
    path = save_lora(lora, tmp_path / "x.safetensors", fmt, version="sdxl")
    base = copy.deepcopy(sdxl)
    pipe = base.pipeline()
    pipe.load_lora_weights(str(path))
    ours = outputs(models["unet"], models["text_encoder"], models["text_encoder_2"], sdxl.tokenizer, sdxl.tokenizer_2)
    theirs = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, sdxl.tokenizer, sdxl.tokenizer_2)
    plain = outputs(sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, sdxl.tokenizer_2)
    for a, b, p in zip(ours, theirs, plain, strict=True):
        assert (a - p).abs().max() > 1e-3  # the LoRA changes every output
        assert (a - b).abs().max() <= 1e-5


def test_apply_to_reproduces_adapted_models(sdxl, tmp_path):
    """A kohya file read back and applied with LoraWeights.apply_to (text_encoder_2 included) gives the same model."""
    lora, models = adapted_sdxl(sdxl)
    back = load_lora(save_lora(lora, tmp_path / "x.safetensors", version="sdxl"))
    fresh = {p: copy.deepcopy(getattr(sdxl, p)) for p in PARTS}
    back.apply_to(**fresh)
    ours = outputs(models["unet"], models["text_encoder"], models["text_encoder_2"], sdxl.tokenizer, sdxl.tokenizer_2)
    again = outputs(fresh["unet"], fresh["text_encoder"], fresh["text_encoder_2"], sdxl.tokenizer, sdxl.tokenizer_2)
    for a, b in zip(ours, again, strict=True):
        assert (a - b).abs().max() <= 1e-6


def _same(a: LoraWeights, b: LoraWeights):
    assert list(a.modules) == list(b.modules) or sorted(a.modules) == sorted(b.modules)
    for k, m in a.modules.items():
        assert torch.equal(m.down, b.modules[k].down) and torch.equal(m.up, b.modules[k].up), k
        assert m.alpha == b.modules[k].alpha, k


def test_round_trips_keep_tensors_and_metadata(sdxl, tmp_path):
    lora, _ = adapted_sdxl(sdxl)
    lora.metadata.update({"ss_output_name": "xl", "ss_network_dim": "4"})
    kohya = read_lora(save_lora(lora, tmp_path / "a.safetensors", version="sdxl"))
    assert kohya[1] == "kohya"
    _same(lora, kohya[0])
    diff = read_lora(save_lora(kohya[0], tmp_path / "b.safetensors", "diffusers"))
    assert diff[1] == "diffusers"
    peft = read_lora(save_lora(diff[0], tmp_path / "c", "peft"))
    assert peft[1] == "peft" and (tmp_path / "c" / "text_encoder_2" / "adapter_config.json").is_file()
    back = read_lora(save_lora(peft[0], tmp_path / "d.safetensors"))
    for got, _ in (diff, peft, back):
        _same(lora, got)
        assert {k: v for k, v in got.metadata.items() if k.startswith(("ss_", "modelspec."))} == \
            {k: v for k, v in kohya[0].metadata.items() if k.startswith(("ss_", "modelspec."))}
    assert kohya[0].metadata["ss_output_name"] == "xl"
    with safetensors.safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert set(f.keys()) == set(safetensors.torch.load_file(tmp_path / "a.safetensors"))


def test_diffusers_named_sdxl_kohya_file_reads_the_same(sdxl, tmp_path):
    """Some tools write SDXL kohya files with diffusers U-Net names (lora_unet_down_blocks_...) and te1/te2."""
    lora, _ = adapted_sdxl(sdxl)
    ours = safetensors.torch.load_file(save_lora(lora, tmp_path / "a.safetensors", version="sdxl"))
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    theirs = {}
    for key, m in lora.modules.items():
        component, path = key.split(".", 1)
        name = prefixes[component] + path.replace(".", "_")
        theirs.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                       f"{name}.alpha": torch.tensor(m.alpha)})
    assert set(theirs) != set(ours) and any("down_blocks" in k for k in theirs)
    safetensors.torch.save_file(theirs, tmp_path / "b.safetensors")
    back = load_lora(tmp_path / "b.safetensors")
    _same(lora, back)
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"  # noted from lora_te1_/lora_te2_


@pytest.mark.parametrize("bad", ["lora_unet_input_blocks_9_0_in_layers_2", "lora_unet_input_blocks_1_0_norm9",
                                 "lora_unet_output_blocks_9_1_proj_in", "lora_unet_middle_block_3_proj_in"])
def test_unmapped_original_names_refused(sdxl, tmp_path, bad):
    """Leftover-key check: a name the block map does not know is one error naming it (none is dropped)."""
    lora, _ = adapted_sdxl(sdxl)
    state = safetensors.torch.load_file(save_lora(lora, tmp_path / "a.safetensors", version="sdxl"))
    state[f"{bad}.lora_down.weight"] = torch.zeros(4, 8)
    state[f"{bad}.lora_up.weight"] = torch.zeros(8, 4)
    safetensors.torch.save_file(state, tmp_path / "b.safetensors")
    with pytest.raises(FormatError, match=bad):
        load_lora(tmp_path / "b.safetensors")


def test_one_module_named_twice_refused(sdxl, tmp_path):
    lora, _ = adapted_sdxl(sdxl)
    state = safetensors.torch.load_file(save_lora(lora, tmp_path / "a.safetensors", version="sdxl"))
    for part in (".lora_down.weight", ".lora_up.weight"):
        state["lora_unet_down_blocks_1_attentions_0_proj_in" + part] = state["lora_unet_input_blocks_4_1_proj_in" + part].clone()
    safetensors.torch.save_file(state, tmp_path / "b.safetensors")
    with pytest.raises(FormatError, match="second time"):
        load_lora(tmp_path / "b.safetensors")


def test_te2_targets_leave_out_text_projection(sdxl):
    configs = lora_configs(sdxl.unet, sdxl.text_encoder, NetworkSpec(4, 1), text_encoder_2=sdxl.text_encoder_2)
    te2 = set(configs["text_encoder_2"].target_modules)
    assert len(te2) == 6 * sdxl.text_encoder_2.config.num_hidden_layers
    assert not any("projection" in t for t in te2)
    assert "text_encoder_2" not in lora_configs(sdxl.unet, sdxl.text_encoder, NetworkSpec(4, 1), train_text_encoder=False,
                                                text_encoder_2=sdxl.text_encoder_2)


# --- the block map against diffusers' original -> diffusers converter ----------------------------------


def _layouts():
    from lora_sd.tiny import sdxl_unet_config

    other = dict(sdxl_unet_config(), layers_per_block=1, block_out_channels=(8, 16, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=1,
                 attention_head_dim=2)
    return {"tiny_sdxl": sdxl_unet_config(), "other_layout": other}


@pytest.mark.parametrize("layout", ["tiny_sdxl", "other_layout"])
def test_block_map_inverts_diffusers_converter(layout):
    """Every U-Net weight renamed to the original layout by our map converts back to its own diffusers key
    through diffusers' convert_ldm_unet_checkpoint (the map is derived from the config: two layouts)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _layouts()[layout]
    unet = UNet2DConditionModel(**config)
    names = SgmNames(unet.config)
    modules = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    state = unet.state_dict()
    original = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        original[f"model.diffusion_model.{names.to_sgm(module)}.{param}"] = tensor
        if module in modules:
            assert names.from_sgm(names.to_sgm(module)) == module
    assert len(original) == len(state)
    converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_reads_what_diffusers_sdxl_pipeline_saves(sdxl, tmp_path):
    """StableDiffusionXLPipeline.save_lora_weights (alphas in its adapter metadata) reads to the same LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    lora, models = adapted_sdxl(sdxl)
    layers = {f"{p}_lora_layers" if p != "unet" else "unet_lora_layers": get_peft_model_state_dict(models[p])
              for p in PARTS}
    meta = {f"{p}_lora_adapter_metadata": models[p].peft_config["default"].to_dict() for p in PARTS}
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "d", **layers, **meta)
    back, fmt = read_lora(tmp_path / "d")
    assert fmt == "diffusers"
    _same(lora, back)
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"  # text_encoder_2 says SDXL
