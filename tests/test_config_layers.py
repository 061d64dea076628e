"""The config layer: what it imports, what it writes (nothing), its tables against the code using them,
one coercer for both configs, help for every option, and tests that keep out of ~/.cache."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toml

from lora_sd import demo
from lora_sd.config import load_config
from lora_sd.config.choices import CHOICES, OPTIMIZERS, SAMPLERS
from lora_sd.config.flags import add_config_arguments
from lora_sd.config.options import FIELDS
from lora_sd.data.dataset_config import load_dataset_config
from lora_sd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_config_imports_nothing_above_it():
    """Loading and checking a config pulls in no training, generation or data code, and no torch."""
    code = ("import sys; from lora_sd.config import TrainConfig; from lora_sd.config.validate import check_values;"
            "from lora_sd.errors import ConfigErrors;"
            "check_values(TrainConfig(pretrained_model_name_or_path='m', train_data_dir='d'), ConfigErrors('x'), False);"
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers') or "
            "m.startswith(('lora_sd.training', 'lora_sd.generate', 'lora_sd.data'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_load_config_writes_nothing(tmp_path, monkeypatch):
    """The demo config loads without making its assets; training's first resolve makes all of them."""
    monkeypatch.setenv("LORA_SD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "demo.toml")
    assert list(tmp_path.iterdir()) == []
    images = demo.asset_path(demo.IMAGES)
    assert [s.image_dir for s in cfg.datasets[0].subsets] == [str(images / name) for name in demo.IMAGE_FOLDERS]
    monkeypatch.setattr(demo, "_make_model", lambda folder: folder.mkdir())  # the real one takes seconds
    assert demo.resolve_demo_path(cfg.pretrained_model_name_or_path) == str(demo.asset_path(demo.MODEL))
    assert len(list((images / demo.IMAGE_FOLDERS[0]).glob("*.png"))) == demo.NUM_IMAGES


def test_demo_images_need_the_demo_model(tmp_path):
    with pytest.raises(ConfigError, match="`train_data_dir` 'demo:images' goes with `pretrained_model_name_or_path"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "demo:images"})
    with pytest.raises(ConfigError, match="`reg_data_dir` 'demo:images' goes with"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path),
                           "reg_data_dir": "demo:images"})
    with pytest.raises(ConfigError, match="`pretrained_model_name_or_path` 'demo:sd3' is not a demo asset"):
        load_config(None, {"pretrained_model_name_or_path": "demo:sd3", "train_data_dir": str(tmp_path)})


def test_samplers_are_what_generate_builds():
    """Every sampler name the config accepts builds its diffusers scheduler in generate, and no other name does."""
    import diffusers

    from lora_sd import generate

    base = diffusers.DDPMScheduler().config
    assert CHOICES["sample_sampler"] == tuple(generate.SAMPLERS)
    for name, (cls, _) in SAMPLERS.items():
        assert type(generate.make_scheduler(name, base)) is getattr(diffusers, cls)
        generate.GenerationSettings(prompts=["p"], sampler=name).check()
    with pytest.raises(ConfigError, match="--sampler"):
        generate.GenerationSettings(prompts=["p"], sampler="eular").check()


def test_optimizers_and_network_args_are_what_training_uses(tmp_path):
    from lora_sd.config import TrainConfig
    from lora_sd.training import network, optim

    (tmp_path / "1_x").mkdir()
    assert list(optim.OPTIMIZERS) == list(OPTIMIZERS)
    for name in OPTIMIZERS:
        assert optim.canonical_optimizer(name.lower()) == name
        assert load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path),
                                  "optimizer_type": name.lower()}).optimizer_type == name.lower()
    spec = network.network_spec(TrainConfig(network_args=["conv_dim=3", "conv_alpha=0.5"]))
    assert (spec.conv_dim, spec.conv_alpha) == (3, 0.5)
    assert optim.parse_optimizer_args(["betas=0.9,0.99"]) == {"betas": (0.9, 0.99)}


RESOLUTIONS = [(512, (512, 512)), ("512", (512, 512)), ("768,512", (768, 512)), (" 768, 512", (768, 512)),
               ([768, 512], (768, 512)), ([512], None), ([512, 512, 512], None), ("a", None), ("512,", None),
               (0, None), (-64, None), ([0, 512], None), (512.0, None), (True, None), ("768x512", None)]


@pytest.mark.parametrize("value, expected", RESOLUTIONS, ids=repr)
def test_resolution_parses_alike_in_both_configs(tmp_path, value, expected):
    """The same `resolution` value gives the same size, or the same refusal, in the training and dataset TOMLs."""
    images = tmp_path / "img" / "1_x"
    images.mkdir(parents=True)
    train = tmp_path / "train.toml"
    train.write_text(toml.dumps({"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path / "img"),
                                 "resolution": value}))
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(toml.dumps({"general": {"resolution": value},
                                   "datasets": [{"subsets": [{"image_dir": str(images)}]}]}))
    results = []
    for load in (lambda: load_config(train).datasets[0].resolution, lambda: load_dataset_config(dataset)[0].resolution):
        try:
            results.append(load())
        except ConfigError as e:
            results.append(str(e).split("resolution` ")[1])
    assert results[0] == results[1]
    assert results[0] == expected if expected else results[0].startswith("must be a positive size")


def test_every_option_has_help():
    assert [name for name, f in FIELDS.items() if not f.metadata.get("help", "").strip()] == []
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name, f in FIELDS.items():
        assert f"--{name}" in text and " ".join(f.metadata["help"].split())[:30] in text


def test_caches_of_tests_are_sandboxed():
    """tests/conftest.py points every cache (and HOME) into a temporary folder: no test writes ~/.cache."""
    import datasets
    import huggingface_hub

    from lora_sd.models.tokenizer import cache_dir

    sandbox = Path(os.environ["HOME"]).parent
    assert sandbox.name.startswith("lora_sd-tests-")
    for path in (Path.home(), demo.cache_root(), cache_dir(), datasets.config.HF_DATASETS_CACHE,
                 huggingface_hub.constants.HF_HOME):
        assert Path(path).is_relative_to(sandbox), path
