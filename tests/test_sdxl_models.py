"""The tiny SDXL: SDXL's structure in small, and diffusers' SDXL pipeline runs on it offline."""

import pytest
import torch

from lora_sd.tiny import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny_sd("sdxl")


def sdxl_outputs(model, seed=0, prompt="a photo of a cat"):
    """{te1 hidden, te2 hidden, te2 text_embeds, U-Net output} on fixed inputs, the U-Net with text_time conditioning."""
    gen = torch.Generator().manual_seed(seed)
    unet_cfg = model.unet.config
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet_cfg.cross_attention_dim, generator=gen)
    pooled = torch.randn(1, model.text_encoder_2.config.projection_dim, generator=gen)
    time_ids = torch.tensor([[64.0, 48.0, 8.0, 0.0, 64.0, 64.0]])
    ids = [tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (model.tokenizer, model.tokenizer_2)]
    with torch.no_grad():
        te2 = model.text_encoder_2(ids[1], output_hidden_states=True)
        return {
            "te1": model.text_encoder(ids[0])[0],
            "te2": te2.hidden_states[-2],
            "text_embeds": te2.text_embeds,
            "unet": model.unet(x, torch.tensor([10]), context,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample,
        }


def test_tiny_sdxl_has_sdxl_structure(tiny_sdxl):
    cfg = tiny_sdxl.unet.config
    assert tiny_sdxl.version == "sdxl"
    assert cfg.addition_embed_type == "text_time" and max(cfg.transformer_layers_per_block) > 1
    te1, te2 = tiny_sdxl.text_encoder.config, tiny_sdxl.text_encoder_2.config
    assert type(tiny_sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert cfg.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    assert tiny_sdxl.vae.config.scaling_factor == 0.13025
    assert tiny_sdxl.tokenizer.pad_token == "<|endoftext|>"
    assert (tiny_sdxl.tokenizer_2.pad_token, tiny_sdxl.tokenizer_2.pad_token_id) == ("!", 0)
    # SD 1.x / 2.x models have no second encoder
    assert build_tiny_sd("sd1").text_encoder_2 is None


def test_tiny_sdxl_pipeline_generates_offline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and 0 <= image.min() and image.max() <= 1
