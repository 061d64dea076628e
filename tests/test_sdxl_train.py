"""recipes/train.py on the tiny SDXL: sd-scripts' SDXL names, diffusers' SDXL pipeline reproduces the trained
model, overfitting, resume, network_weights, text_encoder_lr pairs, fp8_base and refusals.

Each run is a few steps through `main(argv)`; the tiny SDXL folder and a four-image dataset are made once.
"""

import json

import pytest
import torch

from lora_sd.cli import run_main
from tests.test_train import args, kohya_file, make_assets, one_image_dataset, train_recipe


@pytest.fixture(scope="session")
def xl_assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("sdxl_train_assets"), "sdxl")


def xl_pipeline(assets):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(assets / "model"), local_files_only=True,
                                                     add_watermarker=False)


def unet_inputs(seed=0, batch=1):
    """A fixed SDXL U-Net input: latents, timestep, context (32 + 40 features), pooled (24) and time ids."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([10] * batch),
            torch.randn(batch, 77, 72, generator=gen),
            {"text_embeds": torch.randn(batch, 24, generator=gen),
             "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]] * batch)})


def expected_kohya_names(conv: bool) -> set[str]:
    """sd-scripts' rules (lora_sd.targets) on a fresh tiny SDXL, named by the SDXL block map (FORMATS.md)."""
    from lora_sd.formats.names import kohya_name
    from lora_sd.lora_weights import key_for_module
    from lora_sd.targets import target_modules
    from lora_sd.tiny import build_tiny_sd

    tiny = build_tiny_sd("sdxl")
    names = set()
    for part, model in (("unet", tiny.unet), ("text_encoder", tiny.text_encoder),
                        ("text_encoder_2", tiny.text_encoder_2)):
        for module in target_modules(part, model, with_conv=conv):
            names.add(kohya_name(key_for_module(part, module), sdxl=True, unet_config=tiny.unet.config))
    return names


def test_sdxl_file_has_sd_scripts_names_and_diffusers_reproduces_the_trained_model(xl_assets, tmp_path):
    out = tmp_path / "out"
    result = train_recipe.main(args(xl_assets, out, "--network_dim", "4", "--network_alpha", "2",
                                       "--network_args", "conv_dim=2", "conv_alpha=1", "--max_token_length", "150"))
    assert result.version == "sdxl"
    state, meta = kohya_file(out / "lora.safetensors")
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in state}
    assert names == expected_kohya_names(conv=True)
    for literal in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                    "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2",  # depth 2
                    "lora_unet_middle_block_1_proj_in", "lora_unet_input_blocks_3_0_op",
                    "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_2_mlp_fc2"):
        assert literal in names, literal
    assert not [n for n in names if n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_"))]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}

    pipe = xl_pipeline(xl_assets)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    x, t, context, added = unet_inputs()
    ids_1 = pipe.tokenizer(["a photo of sks shape"], padding="max_length", max_length=77, return_tensors="pt")
    ids_2 = pipe.tokenizer_2(["a photo of sks shape"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        for m in (result.unet, result.text_encoder, result.text_encoder_2):
            m.eval()
        pairs = [(result.unet(x, t, context, added_cond_kwargs=added).sample,
                  pipe.unet(x, t, context, added_cond_kwargs=added).sample),
                 (result.text_encoder(ids_1.input_ids)[0], pipe.text_encoder(ids_1.input_ids)[0]),
                 (result.text_encoder_2(ids_2.input_ids).text_embeds, pipe.text_encoder_2(ids_2.input_ids).text_embeds)]
        pipe.unload_lora_weights()
        base = pipe.unet(x, t, context, added_cond_kwargs=added).sample
    for want, got in pairs:
        assert (want - got).abs().max() <= 1e-5
    assert (pairs[0][0] - base).abs().max() > 1e-6  # the LoRA is not a no-op


def _fixed_loss(pipe, latents, noise, t, captions, time_ids):
    """The SDXL loss of a fixed batch, conditioned as sd-scripts does (through our encode_sdxl)."""
    from lora_sd.models.load import noise_scheduler
    from lora_sd.training.text import encode_sdxl, tokenize

    context, pooled = encode_sdxl(pipe.text_encoder, pipe.text_encoder_2, tokenize(pipe.tokenizer, captions),
                                  tokenize(pipe.tokenizer_2, captions))
    noisy = noise_scheduler().add_noise(latents, noise, t)
    pred = pipe.unet(noisy, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_sdxl_lora_overfits_a_single_image(xl_assets, tmp_path):
    import numpy as np
    from PIL import Image

    data = one_image_dataset(tmp_path).parent
    out = tmp_path / "out"
    train_recipe.main(args(xl_assets, out, "--train_data_dir", str(tmp_path / "one"), "--learning_rate", "1e-2",
                              "--network_dim", "8", "--network_alpha", "8", "--network_args", "conv_dim=8",
                              "conv_alpha=8", "--cache_latents", "--network_train_unet_only",
                              "--cache_text_encoder_outputs", steps=60))  # the tiny SDXL learns in its convs
    pipe = xl_pipeline(xl_assets)
    image = Image.open(data / "0.png").convert("RGB")
    size = image.size[0]
    pixels = torch.from_numpy(np.asarray(image.resize((64, 64), Image.LANCZOS), dtype=np.float32) / 127.5 - 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
        latents = latents.repeat(8, 1, 1, 1)
        noise, t = torch.randn(latents.shape, generator=gen), torch.linspace(50, 950, 8).long()
        time_ids = torch.tensor([[size, size, 0.0, 0.0, 64.0, 64.0]] * 8)  # as trained: original, crop, bucket
        before = _fixed_loss(pipe, latents, noise, t, ["a photo of sks shape"] * 8, time_ids)
        pipe.load_lora_weights(str(out / "lora.safetensors"))
        after = _fixed_loss(pipe, latents, noise, t, ["a photo of sks shape"] * 8, time_ids)
    assert after < 0.9 * before, (before, after)


def test_sdxl_resume_gives_the_same_lora(xl_assets, tmp_path):
    """Both text encoders and the U-Net trained: stopped at the step-2 state, resumed: bit-identical."""
    common = ("--save_every_n_steps", "2", "--save_state", "--text_encoder_lr", "1e-3", "5e-4")
    train_recipe.main(args(xl_assets, tmp_path / "a", *common, steps=4))
    train_recipe.main(args(xl_assets, tmp_path / "b", *common, steps=2))
    result = train_recipe.main(args(xl_assets, tmp_path / "b", *common, "--resume",
                                       str(tmp_path / "b" / "lora-state"), steps=4))
    assert result.steps == 4
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    step2, _ = kohya_file(tmp_path / "a" / "lora-step00000002.safetensors")
    assert any(not torch.equal(a[k], step2[k]) for k in a)


def test_sdxl_network_weights_continues_from_a_file_and_refuses_sd1_loras(xl_assets, tmp_path, tiny_sd1, capsys):
    from tests.helpers import random_lora

    from lora_sd.formats import load_lora, save_lora

    train_recipe.main(args(xl_assets, tmp_path / "first", "--network_dim", "4"))
    start = tmp_path / "first" / "lora.safetensors"
    train_recipe.main(args(xl_assets, tmp_path / "out", "--network_weights", str(start), "--dim_from_weights",
                              "--learning_rate", "0"))
    want, got = load_lora(start), load_lora(tmp_path / "out" / "lora.safetensors")
    assert got.modules.keys() == want.modules.keys() and any(k.startswith("text_encoder_2.") for k in got.modules)
    for k, m in want.modules.items():
        assert torch.equal(got.modules[k].down, m.down) and torch.equal(got.modules[k].up, m.up)
    sd1 = save_lora(random_lora(tiny_sd1), tmp_path / "sd1.safetensors", "kohya")
    code = run_main(train_recipe.main, args(xl_assets, tmp_path / "bad", "--network_weights", str(sd1)))
    assert code == 2 and not (tmp_path / "bad" / "lora.safetensors").exists()
    assert "a LoRA for SD 1.x, but the base model is SDXL" in capsys.readouterr().err


def test_text_encoder_lr_pair_reaches_the_two_param_groups(xl_assets, tmp_path, monkeypatch):
    from lora_sd.config import load_config
    from lora_sd.training import optim

    seen = []
    real = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda name, groups, *a: seen.append(groups) or
                        real(name, groups, *a))
    train_recipe.main(args(xl_assets, tmp_path / "out", "--text_encoder_lr", "3e-4", "2e-4", "--unet_lr", "1e-3",
                              steps=1))
    groups = seen[0]
    assert [g["lr"] for g in groups] == [3e-4, 2e-4, 1e-3]
    n_te1 = sum(p.numel() for p in groups[0]["params"])
    n_te2 = sum(p.numel() for p in groups[1]["params"])
    assert n_te1 != n_te2 and n_te1 and n_te2  # te2 is wider: its own group
    # one value: both text encoders; a TOML list of two; more is refused
    assert load_config(None, {"text_encoder_lr": "1e-4", "pretrained_model_name_or_path": "m",
                              "train_data_dir": str(xl_assets / "images")}).text_encoder_lr == 1e-4
    toml = tmp_path / "c.toml"
    toml.write_text(f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "{xl_assets / "images"}"\n'
                    'text_encoder_lr = [1e-4, 5e-5]\n')
    assert load_config(toml).text_encoder_lr == [1e-4, 5e-5]
    bad = run_main(train_recipe.main, args(xl_assets, tmp_path / "bad", "--text_encoder_lr", "1", "2", "3"))
    assert bad == 2


def test_fp8_base_trains_with_float8_weights(xl_assets, tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    out = tmp_path / "out"
    result = train_recipe.main(args(xl_assets, out, "--fp8_base", "--mixed_precision", "bf16"))
    base = dict(result.unet.named_modules())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert base.base_layer.weight.dtype == torch.float8_e4m3fn
    assert base.lora_A["default"].weight.dtype == torch.float32
    assert dict(result.text_encoder_2.named_modules())[
        "text_model.encoder.layers.0.mlp.fc1"].base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    state, _ = kohya_file(out / "lora.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("bad", ["fp8_no_mixed", "cache_with_te", "cache_with_shuffle"])
def test_sdxl_refusals_exit_2_and_write_nothing(xl_assets, tmp_path, bad, capsys):
    extra = {"fp8_no_mixed": ["--fp8_base"],
             "cache_with_te": ["--cache_text_encoder_outputs"],
             "cache_with_shuffle": ["--cache_text_encoder_outputs", "--network_train_unet_only",
                                    "--shuffle_caption"]}[bad]
    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(xl_assets, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert {"fp8_no_mixed": "`fp8_base`", "cache_with_te": "network_train_unet_only",
            "cache_with_shuffle": "`shuffle_caption`"}[bad] in err
    assert not out.exists() or not any(out.iterdir())
