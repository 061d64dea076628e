"""Architecture configs of SDXL 1.0 base, shipped so SDXL single files load offline.

The numbers are those of the published diffusers configs of
stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/,
text_encoder_2/ config.json), as diffusers' own single-file code and tests
quote them. Fine-tunes (Pony, Illustrious, NoobAI, ...) share them; a
`model_config` folder overrides them as for SD 1.x / 2.x.
"""

from .sd_configs import _TEXT_COMMON, TEXT_SD1, VAE

UNET_SDXL = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],  # 64 channels per head
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states, concatenated
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's pooled projection (1280)
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

# SD's VAE architecture; SDXL's latents are scaled by 0.13025, and it overflows in fp16 (diffusers upcasts it).
VAE_SDXL = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# SDXL's first text encoder is SD 1.x's OpenAI CLIP ViT-L/14 text tower.
TEXT_SDXL = dict(TEXT_SD1)

# OpenCLIP ViT-bigG/14 text tower, all 32 blocks (SDXL takes the penultimate hidden states for the
# context, the final ones for the pooled, projected `text_embeds`), as transformers'
# CLIPTextModelWithProjection.
TEXT_SDXL_2 = dict(
    _TEXT_COMMON, hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
    num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
)
