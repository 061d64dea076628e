"""merge_lora, svd_merge_lora, extract_lora_from_models and generate on the tiny SDXL, text_encoder_2 included.

References are diffusers' own application of the files: StableDiffusionXLPipeline.load_lora_weights
with set_adapters (weights per LoRA), not our arithmetic. LoRA a: all three parts, dim 4/alpha 2,
conv 2/alpha 1; b: U-Net only, dim 6/alpha 1, conv 3/alpha 4.
"""

import copy
import logging

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from lora_sd.cli import run_main
from lora_sd.formats import load_lora, save_lora
from lora_sd.lora_weights import LoraWeights
from lora_sd.models import load_base
from lora_sd.targets import NetworkSpec, TEXT_ENCODER_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES, UNET_TARGET_CLASSES
from lora_sd.targets import lora_configs
from lora_sd.tiny import build_tiny_sd, save_tiny_diffusers, save_tiny_single_file
from tests.helpers import add_random_adapters
from recipes import extract_lora_from_models, generate, merge_lora, svd_merge_lora
from tests.test_ops_extract import add_known_delta
from tests.test_sdxl_formats import outputs

RATIOS = [0.8, -0.5]
PARTS = ("unet", "text_encoder", "text_encoder_2")


def sdxl_lora(model, dim, alpha, conv_dim, conv_alpha, seed, text_encoders=True, scale=0.3) -> LoraWeights:
    """Random LoRA weights on copies of the SDXL parts (sd-scripts' targets, both text encoders)."""
    models = {p: copy.deepcopy(getattr(model, p)) for p in PARTS}
    configs = lora_configs(models["unet"], models["text_encoder"], NetworkSpec(dim, alpha, conv_dim, conv_alpha),
                           train_text_encoder=text_encoders, text_encoder_2=models["text_encoder_2"])
    return add_random_adapters(models, configs, seed, scale)


def model_outputs(model):
    return outputs(model.unet, model.text_encoder, model.text_encoder_2, model.tokenizer, model.tokenizer_2)


def diffusers_outputs(base, files, weights, fuse=False):
    """Outputs of `base` with the LoRA files loaded by diffusers' SDXL pipeline, weighted by set_adapters."""
    pipe = copy.deepcopy(base).pipeline()
    names = [f"l{i}" for i in range(len(files))]
    for name, path in zip(names, files, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(weights))
    if fuse:
        pipe.fuse_lora(adapter_names=names)
    return outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, base.tokenizer, base.tokenizer_2)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    base = build_tiny_sd("sdxl")
    d = tmp_path_factory.mktemp("sdxl_ops")
    loras = {"a": sdxl_lora(base, 4, 2, 2, 1, seed=1), "b": sdxl_lora(base, 6, 1, 3, 4, seed=2, text_encoders=False),
             "c": sdxl_lora(base, 4, 2, 2, 1, seed=3)}
    files = {k: save_lora(v, d / f"{k}.safetensors", version="sdxl") for k, v in loras.items()}
    single, config = save_tiny_single_file(d / "model.safetensors", "sdxl")
    folder = save_tiny_diffusers(d / "model_dir", "sdxl")
    ref = diffusers_outputs(base, [files["a"], files["b"]], RATIOS)
    return dict(base=base, dir=d, loras=loras, files=files, single=single, config=config, folder=folder, ref=ref)


def _run(main, argv, capsys):
    """(exit code, the `error:` lines + newline each) of a recipe run (progress bars of model loading left out)."""
    rc = run_main(main, [str(a) for a in argv])
    return rc, "".join(ln + "\n" for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower())


@pytest.mark.parametrize("kind", ["single_file", "folder"])
def test_merge_into_sdxl_model_equals_diffusers(xl, kind, tmp_path):
    single = kind == "single_file"
    src, out = (xl["single"], tmp_path / "merged.safetensors") if single else (xl["folder"], tmp_path / "m")
    argv = ["--sd_model", src, "--save_to", out, "--models", xl["files"]["a"], xl["files"]["b"], "--ratios", *RATIOS]
    config = ["--model_config", xl["config"]] if kind == "single_file" else []
    merge_lora.main([str(a) for a in argv + config])
    merged = load_base(out, model_config=xl["config"] if kind == "single_file" else None)
    assert merged.version == "sdxl"
    got = model_outputs(merged)
    assert max_diff(got, xl["ref"]) <= 1e-4
    assert max_diff(got, diffusers_outputs(xl["base"], [xl["files"]["a"], xl["files"]["b"]], RATIOS, fuse=True)) <= 1e-4
    plain = model_outputs(xl["base"])
    for g, p in zip(got, plain, strict=True):  # every part changed: text_encoder_2 included
        assert (g - p).abs().max() > 1e-3
    if kind == "single_file":
        assert any(k.startswith("conditioner.embedders.1.") for k in safetensors.torch.load_file(str(out)))


def test_exact_lora_merge_equals_both_adapters(xl, tmp_path):
    out = tmp_path / "ab.safetensors"
    merge_lora.main([str(a) for a in ["--save_to", out, "--models", xl["files"]["a"], xl["files"]["b"],
                                      "--ratios", *RATIOS]])
    merged = load_lora(out)
    assert set(merged.components) == set(PARTS)
    assert merged.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert max_diff(diffusers_outputs(xl["base"], [out], [1.0]), xl["ref"]) <= 1e-4


def test_kohya_mode_merge_is_sd_scripts_formula(xl, tmp_path):
    out = tmp_path / "ac.safetensors"
    merge_lora.main([str(a) for a in ["--save_to", out, "--models", xl["files"]["a"], xl["files"]["c"],
                                      "--ratios", *RATIOS, "--concat", "false"]])
    merged = load_lora(out)
    a, c = xl["loras"]["a"], xl["loras"]["c"]
    assert set(merged.modules) == set(a.modules) and "text_encoder_2" in merged.components
    r1, r2 = RATIOS
    for key, m in merged.modules.items():
        assert m.rank == a.modules[key].rank and m.alpha == a.modules[key].alpha
        assert torch.allclose(m.up, abs(r1) * a.modules[key].up + abs(r2) * c.modules[key].up, atol=1e-6), key
        assert torch.allclose(m.down, r1 * a.modules[key].down + r2 * c.modules[key].down, atol=1e-6), key


def test_full_rank_svd_merge_reproduces_the_sum(xl, tmp_path):
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main([str(a) for a in ["--save_to", out, "--models", xl["files"]["a"], xl["files"]["b"],
                                          "--ratios", *RATIOS, "--new_rank", "10", "--new_conv_rank", "5"]])
    merged = load_lora(out)
    assert set(merged.components) == set(PARTS)
    assert merged.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert max_diff(diffusers_outputs(xl["base"], [out], [1.0]), xl["ref"]) <= 1e-4


@pytest.fixture(scope="module")
def tuned(xl):
    """The tiny SDXL plus known rank-2 deltas on the U-Net (3x3 convs too) and text encoder 2; te1 unchanged."""
    model = build_tiny_sd("sdxl")
    deltas = add_known_delta(model.unet, UNET_TARGET_CLASSES + UNET_CONV_TARGET_CLASSES, True, seed=5)
    te2 = add_known_delta(model.text_encoder_2, TEXT_ENCODER_TARGET_CLASSES, False, seed=6)
    deltas.update({k.replace("text_encoder.", "text_encoder_2.", 1): v for k, v in te2.items()})
    folder = xl["dir"] / "tuned"
    if not folder.exists():
        model.pipeline().save_pretrained(str(folder))
    return model, folder, deltas


def test_extraction_recovers_known_delta_both_text_encoders(xl, tuned, tmp_path, caplog):
    model, folder, deltas = tuned
    out = tmp_path / "x.safetensors"
    with caplog.at_level(logging.INFO):
        extract_lora_from_models.main([str(a) for a in [
            "--model_org", xl["single"], "--model_config", xl["config"], "--model_tuned", folder, "--save_to", out,
            "--dim", "4", "--conv_dim", "3"]])
    assert "text encoder: largest weight difference 0 is not above" in caplog.text
    lora = load_lora(out)
    assert lora.components == ["unet", "text_encoder_2"]
    assert set(lora.modules) == set(deltas)
    for key, m in lora.modules.items():
        assert torch.allclose(m.delta(), deltas[key], atol=1e-5), key
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert max_diff(diffusers_outputs(xl["base"], [out], [1.0]), model_outputs(model)) <= 1e-4


def test_extraction_of_changed_text_encoder_1(xl):
    from lora_sd.ops import extract_lora
    from lora_sd.ops.merge import model_parts

    model = build_tiny_sd("sdxl")
    te1 = add_known_delta(model.text_encoder, TEXT_ENCODER_TARGET_CLASSES, False, seed=7)
    lora = extract_lora(model_parts(xl["base"]), model_parts(model), dim=2)
    assert lora.components == ["text_encoder"] and set(lora.modules) == set(te1)


def test_extraction_from_identical_sdxl_models_refused(xl, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    rc, err = _run(extract_lora_from_models.main, ["--model_org", xl["single"], "--model_config", xl["config"],
                                                   "--model_tuned", xl["folder"], "--save_to", out], capsys)
    assert rc == 2 and "do not differ" in err and err.count("\n") == 1
    assert not out.exists()


SIZE = ["--W", "64", "--H", "64", "--steps", "2", "--seed", "7", "--device", "cpu"]


def _images(outdir):
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(outdir.glob("*.png"))]


def _generate(xl, outdir, *extra):
    generate.main([str(a) for a in ["--ckpt", xl["folder"], "--outdir", outdir, "--prompt", "a photo of a cat",
                                    *SIZE, *extra]])
    return _images(outdir)


def test_generate_with_sdxl_loras_adapters_equal_merged(xl, tmp_path):
    muls = ["--network_weights", xl["files"]["a"], xl["files"]["b"], "--network_mul", *RATIOS]
    base = _generate(xl, tmp_path / "base")
    adapters = _generate(xl, tmp_path / "adapters", *muls)
    merged = _generate(xl, tmp_path / "merged", *muls, "--network_merge")
    assert len(base) == 1 and base[0].shape == (64, 64, 3)
    assert np.abs(adapters[0] - merged[0]).max() <= 2
    assert np.abs(base[0] - adapters[0]).max() > 2  # the LoRAs do change the image


def test_generate_te2_only_lora_changes_the_image(xl, tmp_path):
    """A LoRA on text_encoder_2 alone reaches the SDXL pipeline (adapters and merged)."""
    lora = xl["loras"]["a"]
    te2 = save_lora(LoraWeights({k: m for k, m in lora.modules.items() if k.startswith("text_encoder_2.")},
                                dict(lora.metadata)), tmp_path / "te2.safetensors", version="sdxl")
    base = _generate(xl, tmp_path / "base")
    for extra in ([], ["--network_merge"]):
        images = _generate(xl, tmp_path / f"te2{len(extra)}", "--network_weights", te2, "--network_mul", "3", *extra)
        assert np.abs(base[0] - images[0]).max() > 2


def test_generate_default_size_is_1024_for_sdxl(xl, tmp_path, monkeypatch):
    import lora_sd.generate as gen

    seen = {}
    monkeypatch.setattr(gen, "run_pipeline", lambda pipe, settings, plan, networks=(): seen.update(
        W=settings.W, H=settings.H, pipe=type(pipe).__name__) or [])
    generate.main([str(a) for a in ["--ckpt", xl["folder"], "--outdir", tmp_path, "--prompt", "a", "--device", "cpu"]])
    assert seen == {"W": 1024, "H": 1024, "pipe": "StableDiffusionXLPipeline"}


# --- SD 1.x/2.x and SDXL never mixed: one line naming the file, exit 2, nothing written -----------------


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tmp_path_factory):
    from tests.helpers import random_lora

    d = tmp_path_factory.mktemp("sd1_for_xl")
    lora = save_lora(random_lora(tiny_sd1, 4, 2, seed=1), d / "sd1_lora.safetensors", version="sd1")
    single, config = save_tiny_single_file(d / "sd1.safetensors", "sd1")
    return dict(lora=lora, single=single, config=config, folder=save_tiny_diffusers(d / "sd1_dir", "sd1"))


def test_sdxl_lora_into_sd1_model_refused(xl, sd1, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, err = _run(merge_lora.main, ["--sd_model", sd1["single"], "--model_config", sd1["config"], "--save_to", out,
                                     "--models", xl["files"]["a"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(xl["files"]["a"]) in err and "SDXL" in err
    assert not out.exists()
    rc, err = _run(generate.main, ["--ckpt", sd1["folder"], "--outdir", tmp_path / "img", "--prompt", "a", *SIZE,
                                   "--network_weights", xl["files"]["a"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(xl["files"]["a"]) in err and "SDXL" in err
    assert not list(tmp_path.glob("img/*"))


def test_sd1_lora_into_sdxl_model_refused(xl, sd1, tmp_path, capsys):
    out = tmp_path / "m"
    rc, err = _run(merge_lora.main, ["--sd_model", xl["folder"], "--save_to", out, "--models", sd1["lora"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(sd1["lora"]) in err and "the model is SDXL" in err
    assert not out.exists()
    rc, err = _run(generate.main, ["--ckpt", xl["folder"], "--outdir", tmp_path / "img", "--prompt", "a", *SIZE,
                                   "--network_weights", sd1["lora"], "--network_merge"], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(sd1["lora"]) in err
    assert not list(tmp_path.glob("img/*"))


def test_sd1_and_sdxl_loras_not_svd_merged(xl, sd1, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    rc, err = _run(svd_merge_lora.main, ["--save_to", out, "--models", xl["files"]["a"], sd1["lora"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(sd1["lora"]) in err and "SDXL" in err
    assert not out.exists()


def test_extraction_between_sd1_and_sdxl_refused(xl, sd1, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    rc, err = _run(extract_lora_from_models.main, ["--model_org", sd1["folder"], "--model_tuned", xl["folder"],
                                                   "--save_to", out], capsys)
    assert rc == 2 and err.count("\n") == 1 and "SDXL" in err
    assert not out.exists()
