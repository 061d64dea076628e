"""recipes/extract_lora_from_models.py: a known low-rank delta added to a model comes back out."""

import logging

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.errors import ConfigError
from lora_sd.formats import load_lora
from lora_sd.lora_weights import key_for_module
from lora_sd.ops import extract_lora
from lora_sd.targets import TEXT_ENCODER_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES, UNET_TARGET_CLASSES, find_targets
from lora_sd.tiny import build_tiny_sd, save_tiny_diffusers, save_tiny_single_file
from recipes.extract_lora_from_models import main

KNOWN_RANK = 2


def add_known_delta(model, classes, with_conv, seed):
    """Add a random rank-2 delta to every sd-scripts target weight; returns {key: delta}."""
    gen = torch.Generator().manual_seed(seed)
    component = "unet" if "Transformer2DModel" in classes else "text_encoder"
    named = dict(model.named_modules())
    deltas = {}
    with torch.no_grad():
        for name in find_targets(model, classes, with_conv):
            w = named[name].weight
            low = torch.randn(w.shape[0], KNOWN_RANK, generator=gen) @ torch.randn(KNOWN_RANK, w[0].numel(), generator=gen)
            delta = (0.05 * low).reshape(w.shape)
            w += delta
            deltas[key_for_module(component, name)] = delta
    return deltas


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    """org: a tiny single file; tuned: the same plus known deltas on the U-Net (3x3 convs too), TE unchanged."""
    version = request.param
    d = tmp_path_factory.mktemp(f"extract_{version}")
    org_file, config = save_tiny_single_file(d / "org.safetensors", version)
    tuned = build_tiny_sd(version)
    deltas = add_known_delta(tuned.unet, UNET_TARGET_CLASSES + UNET_CONV_TARGET_CLASSES, True, seed=5)
    tuned_dir = d / "tuned"
    tuned.pipeline().save_pretrained(str(tuned_dir))  # a diffusers folder: mixed inputs
    return version, d, org_file, config, tuned_dir, deltas


def test_extraction_recovers_known_delta_and_skips_unchanged_te(models, tmp_path, caplog):
    version, _, org_file, config, tuned_dir, deltas = models
    out = tmp_path / "x.safetensors"
    with caplog.at_level(logging.INFO):
        main(["--model_org", str(org_file), "--model_tuned", str(tuned_dir), "--save_to", str(out),
              "--dim", "4", "--conv_dim", "3", "--model_config", str(config)] + (["--v2"] if version == "sd2" else []))
    assert "text encoder is left out" in caplog.text
    lora = load_lora(out)
    assert lora.components == ["unet"]
    assert set(lora.modules) == set(deltas)
    for key, m in lora.modules.items():
        assert torch.allclose(m.delta(), deltas[key], atol=1e-5), key
    meta = lora.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_v2"] == str(version == "sd2") and "conv_dim" in meta["ss_network_args"]


def test_changed_text_encoder_is_extracted(tiny_sd1):
    tuned = build_tiny_sd("sd1")
    te_deltas = add_known_delta(tuned.text_encoder, TEXT_ENCODER_TARGET_CLASSES, False, seed=6)
    add_known_delta(tuned.unet, UNET_TARGET_CLASSES + UNET_CONV_TARGET_CLASSES, True, seed=7)
    lora = extract_lora({"unet": tiny_sd1.unet, "text_encoder": tiny_sd1.text_encoder},
                        {"unet": tuned.unet, "text_encoder": tuned.text_encoder}, dim=3, method="randomized")
    assert set(lora.components) == {"unet", "text_encoder"}
    for key, delta in te_deltas.items():
        assert torch.allclose(lora.modules[key].delta(), delta, atol=1e-5), key
    # no conv_dim: only the transformer blocks' Linear / 1x1 modules of the U-Net
    assert all(m.down.dim() == 2 or m.down.shape[-1] == 1 for m in lora.modules.values())


def test_unchanged_unet_is_left_out(tiny_sd1):
    tuned = build_tiny_sd("sd1")
    te_deltas = add_known_delta(tuned.text_encoder, TEXT_ENCODER_TARGET_CLASSES, False, seed=6)
    lora = extract_lora({"unet": tiny_sd1.unet, "text_encoder": tiny_sd1.text_encoder},
                        {"unet": tuned.unet, "text_encoder": tuned.text_encoder}, dim=3)
    assert lora.components == ["text_encoder"] and set(lora.modules) == set(te_deltas)


def test_identical_models_are_refused_and_nothing_written(models, tmp_path, capsys):
    """Identical weights (another copy of the original model) would give an all-zero LoRA."""
    version, _, org_file, config, _, _ = models
    same = save_tiny_diffusers(tmp_path / "same", version)
    out = tmp_path / "x.safetensors"
    for extra in ([], ["--min_diff", "0"]):
        rc = run_main(main, ["--model_org", str(org_file), "--model_config", str(config), "--model_tuned", str(same),
                             "--save_to", str(out), "--dim", "4", "--conv_dim", "2", *extra]
                      + (["--v2"] if version == "sd2" else []))
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert rc == 2 and len(errors) == 1 and "the models do not differ" in errors[0], errors
        assert str(org_file) in errors[0] and str(same) in errors[0]
        assert list(tmp_path.iterdir()) == [same]


def test_models_differing_by_no_more_than_min_diff_are_refused(tiny_sd1):
    tuned = build_tiny_sd("sd1")
    with torch.no_grad():
        tuned.unet.down_blocks[0].attentions[0].proj_in.weight += 0.005
    org_parts = {"unet": tiny_sd1.unet, "text_encoder": tiny_sd1.text_encoder}
    tuned_parts = {"unet": tuned.unet, "text_encoder": tuned.text_encoder}
    with pytest.raises(ConfigError, match="the models do not differ.*largest difference 0.005"):
        extract_lora(org_parts, tuned_parts, dim=2)
    lora = extract_lora(org_parts, tuned_parts, dim=2, min_diff=0.001)  # smaller differences on request
    assert lora.components == ["unet"]  # the text encoder does not differ
    delta = lora.modules["unet.down_blocks.0.attentions.0.proj_in"].delta()
    assert torch.allclose(delta, torch.full_like(delta, 0.005), atol=1e-5)


def test_rank_larger_than_module_is_clamped(tiny_sd1, caplog):
    tuned = build_tiny_sd("sd1")
    add_known_delta(tuned.unet, UNET_TARGET_CLASSES, False, seed=8)
    with caplog.at_level(logging.WARNING):
        lora = extract_lora({"unet": tiny_sd1.unet}, {"unet": tuned.unet}, dim=100)
    assert "clamped" in caplog.text
    assert all(m.rank <= min(m.up.shape[0], m.down[0].numel()) for m in lora.modules.values())


@pytest.mark.parametrize("extra, message", [
    (["--dim", "0"], "--dim: must be a positive"),
    (["--dim", "4", "--save_precision", "fp64"], "--save_precision"),
] + ([] if torch.cuda.is_available() else [(["--dim", "4", "--device", "cuda"], "no CUDA GPU")]))
def test_bad_input_one_line_nothing_written(models, tmp_path, capsys, extra, message):
    _, _, org_file, config, tuned_dir, _ = models
    out = tmp_path / "x.safetensors"
    rc = run_main(main, ["--model_org", str(org_file), "--model_tuned", str(tuned_dir), "--save_to", str(out),
                         "--model_config", str(config), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_models_of_different_versions_are_refused(models, tmp_path, capsys):
    version, _, org_file, config, _, _ = models
    if version != "sd1":
        pytest.skip("one pair is enough")
    other = save_tiny_diffusers(tmp_path / "sd2", "sd2")
    out = tmp_path / "x.safetensors"
    rc = run_main(main, ["--model_org", str(org_file), "--model_config", str(config), "--model_tuned", str(other),
                         "--save_to", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "SD 2.x" in errors[0] and not out.exists()
