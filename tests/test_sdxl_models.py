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


def assert_same_outputs(a, b):
    got, want = sdxl_outputs(a), sdxl_outputs(b)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def sdxl_folder(tiny_sdxl, tmp_path_factory):
    from lora_sd.models import save_diffusers

    return save_diffusers(tiny_sdxl, tmp_path_factory.mktemp("sdxl") / "folder")


def test_diffusers_folder_loads_in_diffusers_and_load_base(tiny_sdxl, sdxl_folder):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from lora_sd.models import load_base

    for sub in ("text_encoder", "text_encoder_2"):  # transformers 4's names, the `text_model.` level included
        with safe_open(str(sdxl_folder / sub / "model.safetensors"), "pt") as f:
            assert all(k.startswith(("text_model.", "text_projection.")) for k in f.keys()), sub
    for sub in ("tokenizer", "tokenizer_2"):  # what transformers 4's CLIPTokenizer reads
        assert (sdxl_folder / sub / "vocab.json").is_file() and (sdxl_folder / sub / "merges.txt").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert_same_outputs(pipe, tiny_sdxl)
    model = load_base(sdxl_folder)  # no flag: recognised as SDXL
    assert (model.version, model.source_format, model.v_parameterization) == ("sdxl", "diffusers", False)
    assert model.tokenizer_2.pad_token_id == 0
    assert_same_outputs(model, tiny_sdxl)


def test_v_parameterization_is_allowed_and_v2_is_an_error(sdxl_folder):
    from lora_sd.errors import FormatError
    from lora_sd.models import load_base

    model = load_base(sdxl_folder, v_parameterization=True)
    assert model.version == "sdxl" and model.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(FormatError) as info:
        load_base(sdxl_folder, v2=True)
    msg = str(info.value)
    assert "\n" not in msg and str(sdxl_folder) in msg and "SDXL" in msg and "drop --v2" in msg


@pytest.mark.parametrize("removed,says", [
    (("text_encoder_2",), "an SDXL diffusers folder needs text_encoder_2/"),
    (("tokenizer_2",), "an SDXL diffusers folder needs tokenizer_2/"),
    (("text_encoder", "tokenizer"), "refiner"),
])
def test_incomplete_sdxl_folder_is_one_line(removed, says, sdxl_folder, tmp_path):
    """A missing subfolder is named (transformers 5 would make an empty tokenizer of a missing tokenizer_2/)."""
    import shutil

    from lora_sd.errors import FormatError
    from lora_sd.models import load_base

    folder = tmp_path / "incomplete"
    shutil.copytree(sdxl_folder, folder)
    for sub in removed:
        shutil.rmtree(folder / sub)
    with pytest.raises(FormatError) as info:
        load_base(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and says in msg, msg
