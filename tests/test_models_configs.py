"""The shipped SD 1.5 / 2.1 configs map one to one onto the original layout, at full size.

Models are built on the meta device (no memory, no weights), so the full-size
key maps are checked in a second; `benchmarks/single_file_roundtrip.py` does
the same with real random weights through files.
"""

import pytest
import torch

from lora_sd.models import sd_configs
from lora_sd.models.original_layout import to_original
from lora_sd.models.single_file import convert_to_diffusers, empty_components

# Facts of the original SD files: key -> shape.
SD1_FACTS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.block.0.norm1.weight": (128,),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
SD2_FACTS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.transformer.resblocks.23.ln_2.bias": (1024,),
    "cond_stage_model.model.ln_final.weight": (1024,),
    "cond_stage_model.model.text_projection": (1024, 1024),
}
CASES = [("sd1", False, SD1_FACTS, "v1"), ("sd2", False, SD2_FACTS, "v2"), ("sd2", True, SD2_FACTS, "v2")]


@pytest.mark.parametrize("version,v_pred,facts,diffusers_type", CASES)
def test_full_size_configs_map_one_to_one(version, v_pred, facts, diffusers_type):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    configs = sd_configs.shipped_configs(version, v_pred)
    unet, vae, text = empty_components(configs)
    sds = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    core, extras = to_original(sds["unet"], sds["vae"], sds["text_encoder"], version, configs)
    original = {**core, **extras}
    for key, shape in facts.items():
        assert tuple(original[key].shape) == shape, key
    assert sum(k.startswith("model.diffusion_model.") for k in original) == 686
    assert sum(k.startswith("first_stage_model.") for k in original) == 248
    assert infer_diffusers_model_type(original) == diffusers_type

    back = convert_to_diffusers(original, version, configs)
    for name, sd in sds.items():
        assert set(back[name]) == set(sd), (name, sorted(set(back[name]) ^ set(sd))[:3])
        for k, t in sd.items():
            assert tuple(back[name][k].shape) == tuple(t.shape), (name, k)
    # The U-Net map is a pure renaming: every tensor comes back as the very same object.
    assert all(back["unet"][k] is t for k, t in sds["unet"].items())


def test_shipped_configs_are_the_published_numbers():
    sd1 = sd_configs.shipped_configs("sd1")
    assert sd1["unet"]["cross_attention_dim"] == 768 and sd1["unet"]["attention_head_dim"] == 8
    assert sd1["text_encoder"]["num_hidden_layers"] == 12 and sd1["text_encoder"]["hidden_act"] == "quick_gelu"
    sd2 = sd_configs.shipped_configs("sd2", v_parameterization=True)
    assert sd2["unet"]["attention_head_dim"] == [5, 10, 20, 20] and sd2["unet"]["use_linear_projection"]
    assert sd2["unet"]["sample_size"] == 96 and sd_configs.shipped_configs("sd2")["unet"]["sample_size"] == 64
    assert sd2["text_encoder"]["num_hidden_layers"] == 23 and sd2["text_encoder"]["hidden_size"] == 1024
    assert sd2["vae"]["scaling_factor"] == 0.18215


def test_inpainting_in_channels_come_from_the_file():
    from lora_sd.models.single_file import adapt_unet_config

    cfg = adapt_unet_config(sd_configs.UNET_SD1, {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 9, 3, 3)})
    assert cfg["in_channels"] == 9 and sd_configs.UNET_SD1["in_channels"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_file_round_trip(version, tmp_path):
    """Real random weights through a 4-5 GB file (benchmarks/single_file_roundtrip.py)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "single_file_roundtrip.py"
    spec = importlib.util.spec_from_file_location("single_file_roundtrip", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.run(version, tmp_path)
