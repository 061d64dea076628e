"""recipes/train.py end to end on the tiny SD1 model: files, diffusers loading, resume, refusals.

Each run is a few steps through `main(argv)`; the tiny model folder and a
four-image dataset are made once per session.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import safetensors
import torch

from lora_sd import demo_pretrain
from lora_sd.cli import run_main
from lora_sd.demo import draw_image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
train_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_recipe)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train_assets"))


def make_assets(root: Path, version="sd1") -> Path:
    """The tiny model folder (SD1 by default), four captioned images (`images/2_sks shape`) and two
    regularization images."""
    from lora_sd.tiny import save_tiny_diffusers

    save_tiny_diffusers(root / "model", version)
    sub = root / "images" / "2_sks shape"
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(4):
        draw_image(rng).save(sub / f"{i}.png")
        (sub / f"{i}.caption").write_text(f"a photo of sks shape, red{', blue' if i % 2 else ''}")
    reg = root / "reg" / "1_shape"
    reg.mkdir(parents=True)
    for i in range(2):
        draw_image(rng).save(reg / f"{i}.png")
    return root


def args(assets, out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", str(assets / "model"), "--train_data_dir", str(assets / "images"),
            "--resolution", "64", "--output_dir", str(out), "--output_name", "lora", "--max_train_steps",
            str(steps), "--seed", "1", "--max_data_loader_n_workers", "0", "--learning_rate", "1e-3", *extra]


def refused_run(assets, out, extra, capsys) -> str:
    """A training run refused: exit 2, one `error:` line, no traceback, nothing written to `out`; the error text."""
    assert run_main(train_recipe.main, args(assets, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    return err


def kohya_file(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_demo_runs_and_writes_everything(tmp_path, monkeypatch):
    """The README command on a short schedule: LoRA, config, TensorBoard events, samples, load_lora_weights image."""
    monkeypatch.setenv("LORA_SD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_pretrain, "PLAN", demo_pretrain.PretrainPlan(  # the real one takes a minute
        unet_steps=1, unet_batch=1, scenes=2))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of sks shape --w 64 --h 64 --d 3 --s 2 --l 5\n")
    out = tmp_path / "out"
    result = train_recipe.main(["--config", str(ROOT / "configs" / "demo.toml"), "--max_train_steps", "4",
                                "--output_dir", str(out), "--logging_dir", str(tmp_path / "logs"),
                                "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"])
    assert result.steps == 4 and (out / "demo.safetensors").is_file()
    assert (out / "demo-config.toml").is_file() and (out / "demo-sample.png").is_file()
    assert (out / "demo-report.png").is_file()  # what it shows: tests/test_demo.py
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["demo_000002_00.png", "demo_000004_00.png"]
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder"} <= set(events.Tags()["scalars"])


CASES = {
    "default": ([], {"lora_unet_", "lora_te_"}),
    "conv_dim": (["--network_args", "conv_dim=2", "conv_alpha=1"], {"lora_unet_", "lora_te_"}),
    "unet_only": (["--network_train_unet_only"], {"lora_unet_"}),
    "te_only": (["--network_train_text_encoder_only"], {"lora_te_"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_file_loads_in_diffusers_and_matches_trained_model(assets, tmp_path, case):
    from diffusers import StableDiffusionPipeline

    extra, prefixes = CASES[case]
    out = tmp_path / "out"
    result = train_recipe.main(args(assets, out, "--network_dim", "4", "--network_alpha", "2",
                                    "--training_comment", "hello", *extra))
    state, meta = kohya_file(out / "lora.safetensors")
    assert {k.split("_")[0] + "_" + k.split("_")[1] + "_" for k in state} == prefixes
    convs = [k for k in state if "resnets_0_conv1" in k]
    assert bool(convs) == (case == "conv_dim")
    if convs:
        assert state[next(k for k in convs if k.endswith("lora_down.weight"))].shape[0] == 2
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_steps"] == "2" and meta["ss_training_comment"] == "hello" and meta["ss_seed"] == "1"
    assert meta["ss_num_train_images"] == "8" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks shape": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["2_sks shape"]["a photo of sks shape"] == 4
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["resolution"] == [64, 64]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and len(meta["sshs_model_hash"]) == 64
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.title"] == "lora"
    if case == "conv_dim":
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}

    pipe = StableDiffusionPipeline.from_pretrained(str(assets / "model"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    ids = pipe.tokenizer(["a photo of sks shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for trained, loaded in ((result.unet, pipe.unet), (result.text_encoder, pipe.text_encoder)):
            trained.eval()
        want_te, got_te = result.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        want_unet = result.unet(x, torch.tensor([10]), cond).sample
        got_unet = pipe.unet(x, torch.tensor([10]), cond).sample
    assert (want_te - got_te).abs().max() <= 1e-5 and (want_unet - got_unet).abs().max() <= 1e-5
    # the LoRA is not a no-op: its trained parts change the outputs
    pipe.unload_lora_weights()
    with torch.no_grad():
        base_unet = pipe.unet(x, torch.tensor([10]), cond).sample
    assert ((want_unet - base_unet).abs().max() > 1e-6) == ("lora_unet_" in prefixes)


def one_image_dataset(tmp_path) -> Path:
    """A DreamBooth folder holding one drawn image captioned "a photo of sks shape"; the image's path."""
    data = tmp_path / "one" / "1_sks shape"
    data.mkdir(parents=True)
    draw_image(random.Random(5)).save(data / "0.png")
    (data / "0.caption").write_text("a photo of sks shape")
    return data / "0.png"


def fixed_batch_loss(model, image_path):
    """loss(unet): the denoising loss on one fixed batch of `image_path` (8 copies, fixed noise and timesteps
    50..950) with `model`'s VAE, tokenizer and text encoder, so that two U-Nets compare."""
    import numpy as np
    from PIL import Image

    from lora_sd.models.load import noise_scheduler

    pixels = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
    gen, scheduler = torch.Generator().manual_seed(0), noise_scheduler()
    with torch.no_grad():
        latents = model.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mode() * model.vae.config.scaling_factor
        latents = latents.repeat(8, 1, 1, 1)
        noise, t = torch.randn(latents.shape, generator=gen), torch.linspace(50, 950, 8).long()
        ids = model.tokenizer(["a photo of sks shape"] * 8, padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
        hidden = model.text_encoder(ids)[0]

    def loss(unet) -> float:
        with torch.no_grad():
            pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
            return torch.nn.functional.mse_loss(pred, noise).item()

    return loss


def test_lora_overfits_a_single_image(assets, tmp_path):
    """The loss on one fixed batch (fixed noise and timesteps) goes down measurably after training on it."""
    from diffusers import StableDiffusionPipeline

    image = one_image_dataset(tmp_path)
    out = tmp_path / "out"
    argv = args(assets, out, "--train_data_dir", str(tmp_path / "one"), "--learning_rate", "1e-2",
                "--network_dim", "8", "--network_alpha", "8", "--cache_latents", "--network_train_unet_only",
                steps=60)
    train_recipe.main(argv)

    pipe = StableDiffusionPipeline.from_pretrained(str(assets / "model"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    fixed_loss = fixed_batch_loss(pipe, image)
    before = fixed_loss(pipe.unet)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    after = fixed_loss(pipe.unet)
    assert after < 0.9 * before, (before, after)


def stopped_after_first_state(assets, out, options, monkeypatch, steps=6):
    """A 6-step run into `out` that dies right after its first training-state save (as a killed run): that state."""
    from lora_sd.training import checkpoint

    real_save = checkpoint.save_training_state

    class Interrupted(Exception):
        pass

    def save_then_die(state, folder):
        real_save(state, folder)
        raise Interrupted(folder)

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_die)
    with pytest.raises(Interrupted) as died:
        train_recipe.main(args(assets, out, *options, steps=steps))
    monkeypatch.setattr(checkpoint, "save_training_state", real_save)
    return Path(str(died.value))


def test_resume_gives_the_same_lora(assets, tmp_path, monkeypatch):
    """Interrupted after the step-3 state save, then resumed: the same LoRA as one uninterrupted run."""
    common = ("--save_every_n_steps", "3", "--save_state", "--train_batch_size", "1", "--lr_scheduler", "cosine")
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=6))
    state = stopped_after_first_state(assets, tmp_path / "b", common, monkeypatch)
    assert state.name == "lora-step00000003-state" and not (tmp_path / "b" / "lora.safetensors").exists()
    result = train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(state), steps=6))
    assert result.steps == 6
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    step3, _ = kohya_file(tmp_path / "a" / "lora-step00000003.safetensors")
    assert any(not torch.equal(a[k], step3[k]) for k in a)
    # a state that does not fit the network is refused by name
    code = run_main(train_recipe.main, args(assets, tmp_path / "c", *common, "--resume", str(state),
                                            "--network_dim", "8", steps=6))
    assert code == 2


@pytest.mark.parametrize("stop", [3, 8])  # inside the first epoch (8 batches) / at its last batch
def test_resume_from_the_final_state_continues_the_run(assets, tmp_path, stop):
    """A finished run's state, resumed with more steps: the same LoRA as one longer run."""
    common = ("--save_state", "--train_batch_size", "1")
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=stop + 2))
    train_recipe.main(args(assets, tmp_path / "b", *common, steps=stop))
    result = train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "lora-state"),
                                    steps=stop + 2))
    assert result.steps == stop + 2
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_network_weights_continues_from_a_file(assets, tmp_path, tiny_sd1, fmt):
    from tests.helpers import random_lora

    from lora_sd.formats import load_lora, save_lora

    start = random_lora(tiny_sd1, network_dim=8, network_alpha=2)
    start_path = tmp_path / ("start.safetensors" if fmt == "kohya" else "start_peft")
    save_lora(start, start_path, fmt)
    # learning rate 0: the continued LoRA is the file, unchanged
    train_recipe.main(args(assets, tmp_path / "out", "--network_weights", str(start_path),
                           "--dim_from_weights", "--learning_rate", "0"))
    got = load_lora(tmp_path / "out" / "lora.safetensors")
    assert got.modules.keys() == start.modules.keys()
    for k, m in start.modules.items():
        assert torch.equal(got.modules[k].down, m.down) and torch.equal(got.modules[k].up, m.up)
        assert got.modules[k].alpha == m.alpha
    # without dim_from_weights the ranks must match network_dim
    code = run_main(train_recipe.main, args(assets, tmp_path / "bad", "--network_weights", str(start_path),
                                            "--network_dim", "4"))
    assert code == 2 and not (tmp_path / "bad").exists()


def test_training_options_run(assets, tmp_path, monkeypatch):
    """bf16 autocast with float32 LoRA weights, checkpointing, accumulation, SNR, offset, clip skip, 150 tokens.

    min_snr_gamma and noise_offset reach the loss of every step (their math: test_train_parts)."""
    from lora_sd.training import noise

    seen = {"offset": [], "gamma": []}
    real_noise, real_weight = noise.sample_noise, noise.min_snr_weight
    monkeypatch.setattr(noise, "sample_noise", lambda lat, off, gen: seen["offset"].append(off) or
                        real_noise(lat, off, gen))
    monkeypatch.setattr(noise, "min_snr_weight", lambda sch, t, gamma, v: seen["gamma"].append((gamma, v)) or
                        real_weight(sch, t, gamma, v))
    result = train_recipe.main(args(assets, tmp_path / "out", "--mixed_precision", "bf16", "--gradient_checkpointing",
                                    "--gradient_accumulation_steps", "2", "--min_snr_gamma", "5", "--noise_offset",
                                    "0.1", "--clip_skip", "2", "--max_token_length", "150", "--optimizer_type",
                                    "AdamW8bit", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1",
                                    "--save_model_as", "peft", "--save_every_n_epochs", "1", "--max_train_epochs", "2"))
    assert result.steps == 8 and result.epochs == 2  # 8 images x repeats, batch 1, accumulation 2: 4 steps an epoch
    assert seen["offset"] == [0.1] * 16 and seen["gamma"] == [(5.0, False)] * 16  # 16 micro-batches
    lora_params = [p for n, p in result.unet.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    assert next(p for n, p in result.unet.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    assert (tmp_path / "out" / "lora" / "unet" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "lora-000001" / "unet").is_dir()


def _no_outputs(folder: Path):
    return not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("bad", ["model", "dataset", "fp16", "both_only", "wrong_type", "xformers"])
def test_bad_input_exits_2_and_writes_nothing(assets, tmp_path, bad, capsys):
    out = tmp_path / "out"
    argv = args(assets, out)
    if bad == "model":
        argv += ["--pretrained_model_name_or_path", str(tmp_path / "missing")]
    elif bad == "dataset":
        argv += ["--train_data_dir", str(tmp_path / "nowhere")]
    elif bad == "fp16":
        if torch.cuda.is_available():
            pytest.skip("fp16 is allowed with CUDA")
        argv += ["--mixed_precision", "fp16"]
    elif bad == "both_only":
        argv += ["--network_train_unet_only", "--network_train_text_encoder_only"]
    elif bad == "xformers":
        if torch.cuda.is_available() and importlib.util.find_spec("xformers"):
            pytest.skip("xformers can run here")
        argv += ["--xformers"]
    else:
        argv += ["--network_dim", "four"]
    assert run_main(train_recipe.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert {"model": "missing", "dataset": "nowhere", "fp16": "fp16", "both_only": "network_train_unet_only",
            "wrong_type": "`network_dim` must be an integer", "xformers": "`xformers = true`"}[bad] in err
    assert _no_outputs(out)


def test_nan_loss_stops_and_keeps_the_last_good_save(assets, tmp_path, monkeypatch, capsys):
    from lora_sd.training import noise

    real = noise.diffusion_loss
    calls = []

    def nan_at_third(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(noise, "diffusion_loss", nan_at_third)
    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(assets, out, "--save_every_n_steps", "2", steps=5)) == 2
    err = capsys.readouterr().err
    assert "at step 3" in err and "lora-step00000002.safetensors" in err
    assert (out / "lora-step00000002.safetensors").is_file() and not (out / "lora.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_v2_v_parameterization_diffusers_folder_output(assets, tmp_path, monkeypatch):
    """SD2 tiny model, v-prediction targets, saved as a diffusers folder that load_lora_weights reads."""
    from diffusers import StableDiffusionPipeline

    from lora_sd.tiny import save_tiny_diffusers

    save_tiny_diffusers(tmp_path / "sd2", "sd2")
    from lora_sd.training import noise

    v_flags, real_target = [], noise.target_for
    monkeypatch.setattr(noise, "target_for", lambda *a: v_flags.append(a[-1]) or real_target(*a))
    out = tmp_path / "out"
    result = train_recipe.main(args(assets, out, "--pretrained_model_name_or_path", str(tmp_path / "sd2"), "--v2",
                                    "--v_parameterization", "--save_model_as", "diffusers", "--min_snr_gamma", "5"))
    assert result.version == "sd2" and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert v_flags == [True, True]  # v-prediction targets in both steps
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd2"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(out / "lora"))
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        want = result.unet.eval()(x, torch.tensor([10]), cond).sample
        got = pipe.unet(x, torch.tensor([10]), cond).sample
    assert (want - got).abs().max() <= 1e-5
    # and as a kohya .ckpt: the same weights, readable by load_lora
    from lora_sd.formats import load_lora

    train_recipe.main(args(assets, out, "--pretrained_model_name_or_path", str(tmp_path / "sd2"), "--v2",
                           "--v_parameterization", "--save_model_as", "ckpt"))
    assert load_lora(out / "lora.ckpt").modules


def test_single_file_checkpoint_and_regularization_images(assets, tmp_path):
    """An original-layout .safetensors base model (what most users have) trains the same LoRA names."""
    from lora_sd.tiny import save_tiny_single_file

    path, configs = save_tiny_single_file(tmp_path / "model.safetensors", "sd1")
    out = tmp_path / "out"
    train_recipe.main(args(assets, out, "--pretrained_model_name_or_path", str(path), "--model_config", str(configs),
                           "--reg_data_dir", str(assets / "reg"), "--prior_loss_weight", "0.5"))
    state, meta = kohya_file(out / "lora.safetensors")
    folder_state, _ = kohya_file_from_folder_run(assets, tmp_path)
    assert state.keys() == folder_state.keys() and meta["ss_sd_model_name"] == "model.safetensors"
    # regularization images: counted apart, weighted by prior_loss_weight
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 2}}


def kohya_file_from_folder_run(assets, tmp_path):
    train_recipe.main(args(assets, tmp_path / "folder_out"))
    return kohya_file(tmp_path / "folder_out" / "lora.safetensors")
