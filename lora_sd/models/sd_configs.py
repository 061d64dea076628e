"""Architecture configs of Stable Diffusion 1.5 and 2.1, shipped so single files load offline (SDXL: sdxl_configs).

The numbers are those of the published diffusers configs
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and -2-1-base:
unet/, vae/, text_encoder/ config.json). They are facts about the
architectures, not weights. A `model_config` folder (diffusers layout:
unet/config.json, vae/config.json, text_encoder/config.json, optional
tokenizer/) overrides them; that is how tests load tiny single files.
"""

import copy
import json
from pathlib import Path

from ..errors import ConfigError

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_UNET_COMMON = dict(
    act_fn="silu",
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    down_block_types=list(_DOWN),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    up_block_types=list(_UP),
)

UNET_SD1 = dict(_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, sample_size=64)

# SD 2.x: 64 channels per head (5, 10, 20, 20 heads), OpenCLIP-H context, linear proj_in/out.
UNET_SD2 = dict(
    _UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
    dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
)
# 2.1 (768 px, v-prediction) upcasts attention to fp32; 2.1-base (512 px, eps) does not.
UNET_SD2_V = dict(UNET_SD2, sample_size=96, upcast_attention=True)
UNET_SD2_BASE = dict(UNET_SD2, sample_size=64, upcast_attention=False)

VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.18215,
)

_TEXT_COMMON = dict(
    attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2, initializer_factor=1.0,
    initializer_range=0.02, layer_norm_eps=1e-05, max_position_embeddings=77, pad_token_id=1,
    vocab_size=49408,
)
# OpenAI CLIP ViT-L/14 text tower.
TEXT_SD1 = dict(
    _TEXT_COMMON, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
    num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
)
# OpenCLIP ViT-H/14 text tower without its last block (SD 2.x uses the penultimate layer).
TEXT_SD2 = dict(
    _TEXT_COMMON, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
    num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
)

# SD's training noise schedule (the same for 1.x and 2.x).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False,
)


def shipped_configs(version, v_parameterization=False):
    """{'unet', 'vae', 'text_encoder'} config dicts of SD 1.5 or 2.1 (copies); SDXL 1.0 base adds 'text_encoder_2'.

    SDXL's architecture is the same for epsilon and v-prediction fine-tunes.
    """
    if version == "sdxl":
        from . import sdxl_configs

        return copy.deepcopy({"unet": sdxl_configs.UNET_SDXL, "vae": sdxl_configs.VAE_SDXL,
                              "text_encoder": sdxl_configs.TEXT_SDXL, "text_encoder_2": sdxl_configs.TEXT_SDXL_2})
    if version == "sd1":
        unet, text = UNET_SD1, TEXT_SD1
    elif version == "sd2":
        unet, text = (UNET_SD2_V if v_parameterization else UNET_SD2_BASE), TEXT_SD2
    else:
        raise ConfigError(f"unknown Stable Diffusion version {version!r}, expected 'sd1', 'sd2' or 'sdxl'")
    vae = dict(VAE, sample_size=768) if version == "sd2" and v_parameterization else VAE
    return copy.deepcopy({"unet": unet, "vae": vae, "text_encoder": text})


def _read_config(folder, sub, name="config.json"):
    path = Path(folder) / sub / name
    if not path.is_file():
        raise ConfigError(f"model_config {folder}: {sub}/{name} is missing (expected a diffusers-layout folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_config {path}: not a readable JSON config ({e})") from None
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def folder_configs(folder, version="sd1"):
    """The same configs read from a diffusers-layout folder (`model_config`); SDXL's with text_encoder_2/."""
    if not Path(folder).is_dir():
        raise ConfigError(f"model_config {folder}: not a folder")
    subs = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if version == "sdxl" else ())
    return {sub: _read_config(folder, sub) for sub in subs}


def tokenizer_folder(folder, sub="tokenizer"):
    """`<model_config>/<sub>` (tokenizer or SDXL's tokenizer_2) when it holds tokenizer files, else None."""
    if folder is None:
        return None
    tok = Path(folder) / sub
    has_bpe = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    return tok if has_bpe or (tok / "tokenizer.json").is_file() else None
