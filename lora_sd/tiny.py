"""Tiny Stable Diffusion 1.x / 2.x / XL models built in code, for tests and the demo.

No network: every component is constructed from a config here, weights from a
seed. The shapes are small but the module structure is SD's: cross-attention
transformer blocks, resnets with 3x3 convs and a conv_shortcut, down- and
up-samplers, a VAE with SD's 8x downscale, a CLIP text encoder and a CLIP BPE
tokenizer whose vocabulary is generated here. The tiny SDXL has SDXL's
structure: three resnets per level (layers_per_block 2), a level without
attention first, a transformer depth of 2 in the attention level and the mid
block, `text_time` conditioning, two text encoders (the second with a
projection, of another width, so that concatenation and transposition mistakes
show) and two tokenizers.
"""

from pathlib import Path

import torch

# Words the tiny tokenizer knows as single tokens (everything else falls back
# to byte-level pieces, as in CLIP).
_WORDS = (
    "a photo of cat dog sks girl boy man woman person style painting drawing "
    "red blue green white black shirt hat in on the with and best quality "
    "masterpiece portrait landscape tree house sky sun night day anime"
).split()

TINY_VERSIONS = ("sd1", "sd2", "sdxl")

# Tiny SDXL text encoders: te1 like CLIP ViT-L (quick_gelu), te2 like OpenCLIP bigG (gelu, projection).
SDXL_TE1_WIDTH, SDXL_TE2_WIDTH, SDXL_TE2_PROJECTION = 32, 40, 24
SDXL_TIME_EMBED_DIM = 8


def _tiny_merges() -> list[tuple[str, str]]:
    """BPE merges that make each of `_WORDS` one token."""
    merges, known = [], set()
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            if pieces[0] + pieces[1] not in known:
                merges.append((pieces[0], pieces[1]))
                known.add(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def unet_config(version="sd1"):
    if version == "sdxl":
        return sdxl_unet_config()
    v2 = version == "sd2"
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if v2 else 2,
        use_linear_projection=v2,
        norm_num_groups=4,
    )


def sdxl_unet_config():
    """SDXL's U-Net layout in small: [DownBlock2D, CrossAttn...] levels, depth 2 where attention is."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=SDXL_TE1_WIDTH + SDXL_TE2_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # six time ids (original size, crop, target size), each embedded, + te2's pooled projection
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TE2_PROJECTION,
        norm_num_groups=4,
    )


def vae_config(version="sd1"):
    # Four levels: the same 8x downscale as SD's VAE, so bucket sizes carry over.
    if version == "sdxl":  # SDXL's VAE: another scaling factor, and it overflows in fp16
        return dict(vae_config(), scaling_factor=0.13025, force_upcast=True)
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=0.18215,
    )


def text_encoder_config(version, vocab_size):
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if version == "sd2" else "quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=32,
    )


def sdxl_text_encoder_2_config(vocab_size):
    """OpenCLIP bigG in small: gelu, a projection to another width, pads with "!" (id 0)."""
    return dict(
        text_encoder_config("sd2", vocab_size), hidden_size=SDXL_TE2_WIDTH, intermediate_size=44,
        projection_dim=SDXL_TE2_PROJECTION, pad_token_id=0,
    )


def tiny_tokenizer(version="sd1"):
    """A CLIPTokenizer over a generated vocabulary in CLIP's layout.

    Pads with EOS for "sd1" and "sdxl" (SDXL's first tokenizer), with `!` for "sd2" and "sdxl_2".
    """
    from lora_sd.models.tokenizer import clip_tokenizer, clip_vocab

    merges = _tiny_merges()
    return clip_tokenizer(clip_vocab(merges), merges, version)


def build_tiny_sd(version="sd1", seed=0):
    """Build a deterministic tiny SD1 ('sd1'), SD2 v-prediction ('sd2') or SDXL ('sdxl') model, as an SDModel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if version not in TINY_VERSIONS:
        raise ValueError(f"tiny version must be one of {TINY_VERSIONS}, got {version!r}")
    tokenizer = tiny_tokenizer(version)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(version))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config(version))
    torch.manual_seed(seed + 2)
    # SDXL's first encoder is CLIP ViT-L, as SD 1.x's
    te1_version = "sd1" if version == "sdxl" else version
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(te1_version, len(tokenizer))))
    text_encoder_2 = tokenizer_2 = None
    if version == "sdxl":
        tokenizer_2 = tiny_tokenizer("sdxl_2")
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_text_encoder_2_config(len(tokenizer_2))))
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    from lora_sd.models.load import SDModel, noise_scheduler

    v_pred = version == "sd2"
    return SDModel(unet, vae, text_encoder, tokenizer, noise_scheduler(v_pred), version,
                   v_parameterization=v_pred, source=f"tiny-{version}-seed{seed}", source_format="tiny",
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def save_tiny_diffusers(path, version="sd1", seed=0):
    """Write a tiny model as a diffusers folder (what `from_pretrained` loads), as every folder we write:
    text-encoder keys in the transformers-4 layout (see models.save_diffusers)."""
    from lora_sd.models import save_diffusers

    save_diffusers(build_tiny_sd(version, seed), path)
    return Path(path)


def save_tiny_model_config(folder, version="sd1", seed=0, tiny=None):
    """Write the configs of a tiny model as a diffusers-layout folder without weights.

    unet/, vae/, text_encoder/ (and SDXL's text_encoder_2/) config.json, tokenizer/ (tokenizer_2/) files
    and scheduler/:
    what `load_base(..., model_config=folder)` needs to load a tiny single file.
    """
    tiny = tiny or build_tiny_sd(version, seed)
    folder = Path(folder)
    tiny.unet.save_config(str(folder / "unet"))
    tiny.vae.save_config(str(folder / "vae"))
    tiny.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    tiny.tokenizer.save_pretrained(str(folder / "tokenizer"))
    if tiny.text_encoder_2 is not None:
        tiny.text_encoder_2.config.save_pretrained(str(folder / "text_encoder_2"))
        tiny.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    tiny.scheduler.save_config(str(folder / "scheduler"))
    return folder


def save_tiny_single_file(path, version="sd1", seed=0, model_config=None, save_precision="float"):
    """Write a tiny model as one file in the original SD layout (.safetensors or .ckpt).

    Returns (file_path, model_config_folder); the folder (default: `<stem>_config`
    beside the file) holds the configs and tokenizer that `load_base` needs.
    The weights are those of `build_tiny_sd(version, seed)`, as in
    `save_tiny_diffusers(path, version, seed)`.
    """
    from lora_sd.models import save_single_file

    path = Path(path)
    tiny = build_tiny_sd(version, seed)
    config_folder = Path(model_config or path.with_name(path.stem + "_config"))
    save_tiny_model_config(config_folder, version, seed, tiny)
    save_single_file(tiny, path, save_precision=save_precision)
    return path, config_folder
