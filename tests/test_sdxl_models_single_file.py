"""SDXL single files (Stability's SGM layout) <-> diffusers: offline loading, writing, the full-size key map."""

import pytest
import torch
from safetensors.torch import save_file

from lora_sd.cli import run_main
from lora_sd.errors import FormatError, LoraSdError
from lora_sd.models import load_base, load_state_dict, save_single_file, sd_configs
from lora_sd.models.original_layout import to_original
from lora_sd.models.single_file import convert_to_diffusers, empty_components
from lora_sd.tiny import build_tiny_sd, save_tiny_diffusers, save_tiny_single_file
from tests.test_models_single_file import _assert_same_state_dicts, no_network  # noqa: F401 (a fixture)
from tests.test_sdxl_models import assert_same_outputs

TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """(single file, its model_config folder, the diffusers folder of the same weights)."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    path, config = save_tiny_single_file(root / "sdxl.safetensors", "sdxl", seed=3)
    return path, config, save_tiny_diffusers(root / "sdxl_diffusers", "sdxl", seed=3)


def test_file_has_sdxl_keys(sdxl_files):
    sd = load_state_dict(sdxl_files[0])
    tiny = build_tiny_sd("sdxl", seed=3)
    proj = tiny.text_encoder_2.text_projection.weight  # [projection 24, width 40]
    assert torch.equal(sd[TE2 + "text_projection"], proj.t())  # OpenCLIP's [width, embed]
    q, k, v = (getattr(tiny.text_encoder_2.text_model.encoder.layers[1].self_attn, f"{n}_proj").weight for n in "qkv")
    assert torch.equal(sd[TE2 + "transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(sd["model.diffusion_model.label_emb.0.2.weight"], tiny.unet.add_embedding.linear_2.weight)
    # depth 2 in the attention level: input_blocks.4 is level 1's first resnet + transformer (3 blocks per level)
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in sd
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight" in sd
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight" in sd
    assert TE2 + "ln_final.weight" in sd and TE2 + "token_embedding.weight" in sd and TE2 + "positional_embedding" in sd


def test_round_trips_are_identical(sdxl_files, tmp_path):
    path, config, _ = sdxl_files
    model = load_base(path, model_config=config)  # original -> diffusers
    assert (model.version, model.source_format) == ("sdxl", "single_file")
    tiny = build_tiny_sd("sdxl", seed=3)  # diffusers -> original -> diffusers
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_state_dicts(getattr(model, name).state_dict(), getattr(tiny, name).state_dict())
    out = save_single_file(model, tmp_path / "again.safetensors")  # original -> diffusers -> original
    _assert_same_state_dicts(load_state_dict(path), load_state_dict(out))


def test_single_file_loads_offline_like_its_diffusers_folder(sdxl_files, no_network):
    path, config, folder = sdxl_files
    single, ref = load_base(path, model_config=config), load_base(folder)
    assert single.version == ref.version == "sdxl"
    prompts = ["a photo of a cat", "sks dog in the sky, best quality"]
    for tok, tok_ref in ((single.tokenizer, ref.tokenizer), (single.tokenizer_2, ref.tokenizer_2)):
        assert tok.pad_token == tok_ref.pad_token
        ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ids, tok_ref(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    assert_same_outputs(single, ref)  # both text encoders, the U-Net with text_time conditioning
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(single.vae.encode(image).latent_dist.mean, ref.vae.encode(image).latent_dist.mean)
    assert single.vae.config.scaling_factor == 0.13025


def test_diffusers_reads_our_sdxl_file(sdxl_files):
    """Another tool (diffusers' own single-file loader) reads what we wrote, the projection included."""
    from diffusers import StableDiffusionXLPipeline

    path, _, folder = sdxl_files
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_outputs(theirs, load_base(folder))


def test_user_keys_are_kept(sdxl_files, tmp_path):
    path, config, _ = sdxl_files
    sd = load_state_dict(path)
    extra = {TE2 + "logit_scale": torch.tensor(4.6052), "denoiser.sigmas": torch.rand(1000)}
    user_file = tmp_path / "user.safetensors"
    save_file({**sd, **extra}, str(user_file))
    model = load_base(user_file, model_config=config)
    with torch.no_grad():  # what a LoRA merge does: change weights in place
        model.text_encoder_2.text_projection.weight += 1.0
    written = load_state_dict(save_single_file(model, tmp_path / "merged.safetensors", original_state_dict=user_file))
    assert set(written) == set(sd) | set(extra) and torch.equal(written[TE2 + "logit_scale"], extra[TE2 + "logit_scale"])
    assert torch.equal(written[TE2 + "text_projection"], sd[TE2 + "text_projection"] + 1.0)


def test_shipped_tokenizers_are_offline_and_pad_as_sdxl(no_network):
    from lora_sd.models import load_clip_tokenizer

    tok, tok_2 = load_clip_tokenizer("sdxl"), load_clip_tokenizer("sdxl_2")
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    ids_2 = tok_2(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:7] == ids_2[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # the same BPE vocabulary
    assert ids[7:] == [49407] * 70 and ids_2[7:] == [0] * 70  # ViT-L pads with <|endoftext|>, bigG with "!"


# Facts of the SDXL 1.0 base file (sd_xl_base_1.0.safetensors): key -> shape.
SDXL_FACTS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    TE2 + "token_embedding.weight": (49408, 1280),
    TE2 + "positional_embedding": (77, 1280),
    TE2 + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    TE2 + "transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    TE2 + "ln_final.bias": (1280,),
    TE2 + "text_projection": (1280, 1280),
}


def test_full_size_sdxl_configs_map_one_to_one():
    """The shipped SDXL 1.0 configs, built on the meta device, give SDXL base's key set and back."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    configs = sd_configs.shipped_configs("sdxl")
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["text_encoder_2"]["num_hidden_layers"] == 32
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    sds = {name: m.state_dict() for name, m in zip(names, empty_components(configs))}
    core, extras = to_original(sds["unet"], sds["vae"], sds["text_encoder"], "sdxl", configs, sds["text_encoder_2"])
    original = {**core, **extras}
    for key, shape in SDXL_FACTS.items():
        assert tuple(original[key].shape) == shape, key
    counts = {p: sum(k.startswith(p) for k in original) for p in
              ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.", TE2)}
    # SDXL base 1.0 holds 2515 keys: these, and the OpenCLIP logit_scale our writer keeps only from a user's file
    assert list(counts.values()) == [1680, 248, 197, 389] and len(original) == 2514
    assert infer_diffusers_model_type(original) == "xl_base"
    back = convert_to_diffusers(original, "sdxl", configs)
    for name, sd in sds.items():
        assert set(back[name]) == set(sd), (name, sorted(set(back[name]) ^ set(sd))[:3])
        for k, t in sd.items():
            assert tuple(back[name][k].shape) == tuple(t.shape), (name, k)


def test_shipped_config_path_loads_offline(sdxl_files, no_network, monkeypatch, tmp_path):
    """No model_config: SDXL recognised from the keys, the shipped configs chosen, both real tokenizers built
    offline (the configs are swapped for tiny ones with CLIP's vocabulary size, as a full SDXL does not fit here)."""
    from lora_sd.models import tokenizer
    from lora_sd.tiny import sdxl_text_encoder_2_config, text_encoder_config, unet_config, vae_config

    vocab = tokenizer.VOCAB_SIZE
    te = dict(text_encoder_config("sd1", vocab), bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te_2 = dict(sdxl_text_encoder_2_config(vocab), bos_token_id=0, eos_token_id=2, pad_token_id=1)
    configs = {"unet": unet_config("sdxl"), "vae": vae_config("sdxl"), "text_encoder": te, "text_encoder_2": te_2}
    unet, vae, te1, te2 = (m.to_empty(device="cpu") for m in empty_components(configs))
    for m in (unet, vae, te1, te2):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
    from lora_sd.models import SDModel

    model = SDModel(unet, vae, te1, None, None, "sdxl", text_encoder_2=te2)
    path = save_single_file(model, tmp_path / "sdxl_like.safetensors")
    asked = []
    monkeypatch.setattr(sd_configs, "shipped_configs", lambda v, vp=False: asked.append((v, vp)) or dict(configs))
    loaded = load_base(path, v_parameterization=True)
    assert asked == [("sdxl", True)] and loaded.version == "sdxl" and loaded.v_parameterization
    assert (loaded.tokenizer.pad_token, loaded.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert len(loaded.tokenizer) == len(loaded.tokenizer_2) == vocab
    _assert_same_state_dicts(loaded.text_encoder_2.state_dict(), te2.state_dict())


def _write(sd, path):
    save_file(sd, str(path))
    return path


def _bad_files(sd):
    te1 = "conditioner.embedders.0.transformer."
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    vae = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    yield "refiner.safetensors", {**unet, **vae, **{k.replace(TE2, "conditioner.embedders.0.model."): v
                                                     for k, v in sd.items() if k.startswith(TE2)}}, "SDXL refiner"
    yield "no_te2.safetensors", {k: v for k, v in sd.items() if not k.startswith(TE2)}, "without its " + TE2
    yield "no_te1.safetensors", {k: v for k, v in sd.items() if not k.startswith(te1)}, "without its " + te1
    yield ("sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2), **vae},
           "not a Stable Diffusion 1.x, 2.x or XL checkpoint")
    yield "weights.safetensors", {"fc.weight": torch.zeros(2, 2)}, "not a Stable Diffusion 1.x, 2.x or XL checkpoint"


def test_bad_single_files_are_one_line_naming_the_file(sdxl_files, tmp_path):
    path, config, _ = sdxl_files
    sd = load_state_dict(path)
    for name, content, says in _bad_files(sd):
        with pytest.raises(FormatError) as info:
            load_base(_write(content, tmp_path / name), model_config=config)
        msg = str(info.value)
        assert "\n" not in msg and name in msg and says in msg, msg


def test_v2_with_an_sdxl_file_is_one_error_line(sdxl_files, capsys):
    path, config, _ = sdxl_files
    with pytest.raises(LoraSdError, match=r"sdxl\.safetensors: --v2 was given but the file looks like SDXL"):
        load_base(path, v2=True, model_config=config)
    rc = run_main(lambda argv: load_base(path, v2=True, model_config=config), [])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "SDXL" in err
    assert load_base(path, v_parameterization=True, model_config=config).scheduler.config.prediction_type == (
        "v_prediction")
