"""recipes/generate.py: images with LoRAs as weighted adapters or merged, PNG text chunks, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from lora_sd.cli import run_main
from lora_sd.formats import save_lora
from lora_sd.generate import SAMPLERS
from lora_sd.tiny import save_tiny_diffusers
from recipes.generate import main
from tests.helpers import random_lora

SIZE = ["--W", "32", "--H", "32", "--steps", "3", "--seed", "7", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tiny_sd1, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    model = save_tiny_diffusers(d / "model", "sd1")
    a = random_lora(tiny_sd1, 4, 2, conv_dim=3, conv_alpha=1, seed=21, scale=0.4)
    b = random_lora(tiny_sd1, 8, 1, seed=22, scale=0.4, train_text_encoder=False)
    save_lora(a, d / "a.safetensors", version="sd1")
    save_lora(b, d / "b.safetensors", version="sd1")
    return model, d / "a.safetensors", d / "b.safetensors"


def _images(outdir):
    paths = sorted(outdir.glob("*.png"))
    return paths, [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def _generate(model, outdir, *extra):
    main([str(a) for a in ["--ckpt", model, "--outdir", outdir, "--prompt", "a photo of a cat", *SIZE, *extra]])
    return _images(outdir)


def test_writes_requested_images_with_settings(files, tmp_path):
    model, a, b = files
    main([str(x) for x in ["--ckpt", model, "--outdir", tmp_path, "--prompt", "a photo of a cat",
                           "--prompt", "a dog", "--negative_prompt", "blue", "--images_per_prompt", "2",
                           "--network_weights", a, b, "--network_mul", "0.8", "0.5", "--sampler", "euler_a", *SIZE]])
    paths, images = _images(tmp_path)
    assert len(paths) == 4 and all(im.shape == (32, 32, 3) for im in images)
    text = Image.open(paths[0]).text
    assert text["prompt"] in ("a photo of a cat", "a dog") and text["negative-prompt"] == "blue"
    assert text["sampler"] == "euler_a" and text["steps"] == "3" and text["seed"].isdigit()
    assert "a.safetensors:0.8" in text["networks"] and "Steps: 3, Sampler: euler_a" in text["parameters"]


def test_zero_multipliers_give_the_base_image(files, tmp_path):
    model, a, b = files
    _, base = _generate(model, tmp_path / "base")
    _, zero = _generate(model, tmp_path / "zero", "--network_weights", a, b, "--network_mul", "0", "0")
    _, lora = _generate(model, tmp_path / "lora", "--network_weights", a, b, "--network_mul", "1", "1")
    assert np.array_equal(base[0], zero[0])
    assert np.abs(base[0] - lora[0]).max() > 2  # the LoRAs do change the image


def test_adapters_and_merged_give_the_same_image(files, tmp_path):
    model, a, b = files
    muls = ["--network_weights", a, b, "--network_mul", "0.8", "-0.5"]
    _, adapters = _generate(model, tmp_path / "adapters", *muls)
    _, merged = _generate(model, tmp_path / "merged", *muls, "--network_merge")
    assert np.abs(adapters[0] - merged[0]).max() <= 2


# sd-scripts' --sampler names and the diffusers schedulers they stand for (gen_img_diffusers.py)
INTENDED = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.mark.parametrize("v_parameterization", [False, True])
def test_each_sampler_builds_its_scheduler_on_the_model_schedule(v_parameterization):
    import diffusers

    from lora_sd.generate import make_scheduler
    from lora_sd.models import noise_scheduler

    assert set(SAMPLERS) == set(INTENDED)  # a new name needs its intended scheduler here
    base = noise_scheduler(v_parameterization).config
    for name, (class_name, extra) in INTENDED.items():
        scheduler = make_scheduler(name, base)
        assert type(scheduler) is getattr(diffusers, class_name), name
        config = scheduler.config
        assert config.get("steps_offset", 1) == 1, name  # (DPMSolverSinglestepScheduler has no such option)
        for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
            assert config[key] == base[key], (name, key)
        for key, value in extra.items():
            assert config[key] == value, (name, key)


def test_the_sampler_reaches_the_pipeline(files, tmp_path):
    """Same seed and settings, other samplers: other images (the scheduler is the one asked for)."""
    model, _, _ = files
    images = {}
    for sampler in ("ddim", "euler_a", "dpmsolver++"):
        paths, (image,) = _generate(model, tmp_path / sampler, "--sampler", sampler, "--steps", "2")
        assert Image.open(paths[0]).text["sampler"] == sampler
        images[sampler] = image
    assert not np.array_equal(images["ddim"], images["euler_a"])
    assert not np.array_equal(images["ddim"], images["dpmsolver++"])
    assert not np.array_equal(images["euler_a"], images["dpmsolver++"])


def test_image_j_gets_seed_plus_j(files, tmp_path):
    """Two prompts, two images each, --seed 7: images 0..3 equal single-image runs at seeds 7..10."""
    model, _, _ = files
    argv = ["--ckpt", model, "--W", "32", "--H", "32", "--steps", "2", "--device", "cpu"]
    main([str(x) for x in [*argv, "--outdir", tmp_path / "run", "--prompt", "a cat", "--prompt", "a dog",
                           "--images_per_prompt", "2", "--seed", "7"]])
    paths, images = _images(tmp_path / "run")
    seeds = [int(Image.open(p).text["seed"]) for p in paths]
    assert seeds == [7, 8, 9, 10]
    for j, prompt in ((1, "a cat"), (2, "a dog"), (3, "a dog")):
        out = tmp_path / f"single{j}"
        main([str(x) for x in [*argv, "--outdir", out, "--prompt", prompt, "--seed", 7 + j]])
        assert np.array_equal(_images(out)[1][0], images[j]), j
    assert not np.array_equal(images[2], images[3])  # the seed matters


@pytest.mark.parametrize("extra, message", [
    (["--network_mul", "0.5"], "--network_mul: 1 value(s) for 2"),
    (["--network_mul", "1", "big"], "'big' is not a number"),
    (["--sampler", "k_magic"], "--sampler"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_bad_input_one_line_nothing_written(files, tmp_path, capsys, extra, message):
    model, a, b = files
    argv = ["--ckpt", model, "--outdir", tmp_path / "out", "--prompt", "x", "--network_weights", a, b,
            "--W", "32", "--H", "32", "--steps", "2", *extra]
    rc = run_main(main, [str(x) for x in argv])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(errors) == 1 and message in errors[0]
    assert not list(tmp_path.glob("out/*.png"))


def test_sd2_single_file_adapters_and_merged(tiny_sd2, tmp_path):
    from lora_sd.tiny import save_tiny_single_file

    model, config = save_tiny_single_file(tmp_path / "sd2.safetensors", "sd2")
    a = random_lora(tiny_sd2, 4, 2, conv_dim=3, conv_alpha=1, seed=23, scale=0.4)
    save_lora(a, tmp_path / "a.safetensors", version="sd2")
    common = ["--model_config", config, "--v2", "--v_parameterization", "--network_weights", tmp_path / "a.safetensors",
              "--network_mul", "0.7"]
    _, adapters = _generate(model, tmp_path / "adapters", *common)
    _, merged = _generate(model, tmp_path / "merged", *common, "--network_merge")
    assert np.abs(adapters[0] - merged[0]).max() <= 2


def test_prompts_from_file(files, tmp_path, capsys):
    model, _, _ = files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n", encoding="utf-8")
    paths, _ = _generate(model, tmp_path / "out", "--from_file", prompts, "--steps", "2")
    assert len(paths) == 3  # --prompt plus the two lines
    rc = run_main(main, ["--ckpt", str(model), "--outdir", str(tmp_path / "x"), "--from_file", str(tmp_path / "no.txt")])
    assert rc == 2 and "--from_file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, problem", [
    (["--scale", "nan"], "--scale: must be a finite number, got nan"),
    (["--scale", "inf"], "--scale: must be a finite number, got inf"),
    (["--steps", "0"], "--steps: must be positive, got 0"),
    (["--W", "65"], "--W/--H: must be multiples of 8, got 65xdefault"),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, problem):
    """Checked before anything is read: a missing model path is never looked at."""
    argv = ["--ckpt", str(tmp_path / "no_model"), "--outdir", str(tmp_path / "out"), "--prompt", "a cat", *flags]
    assert run_main(main, argv) == 2
    assert capsys.readouterr().err == f"error: {problem}\n"
    assert not (tmp_path / "out").exists()
