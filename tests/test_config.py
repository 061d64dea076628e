"""TrainConfig: TOML + command line, kohya names and defaults, all errors at once."""

import argparse
from pathlib import Path

import pytest

from lora_sd.config import TrainConfig, add_config_arguments, load_config, overrides_from_args
from lora_sd.training.resolved_config import config_toml
from lora_sd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def _write(tmp_path, text, name="train.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _images(tmp_path):
    folder = tmp_path / "img" / "5_sks dog"
    folder.mkdir(parents=True)
    return tmp_path / "img"


BASE = 'pretrained_model_name_or_path = "model"\n'


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "dataset_example.toml"], ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.pretrained_model_name_or_path and cfg.datasets


def test_defaults_are_sd_scripts():
    cfg = TrainConfig()
    assert (cfg.network_dim, cfg.network_alpha, cfg.optimizer_type, cfg.lr_scheduler) == (4, 1.0, "AdamW", "constant")
    assert (cfg.max_train_steps, cfg.train_batch_size, cfg.mixed_precision, cfg.save_model_as) == (1600, 1, "no", "safetensors")
    assert cfg.prior_loss_weight == 1.0 and cfg.max_grad_norm == 1.0 and cfg.output_name == "last"


def test_cli_overrides_generated_from_fields(tmp_path):
    img = _images(tmp_path)
    path = _write(tmp_path, BASE + f'train_data_dir = "{img}"\nnetwork_dim = 4\n')
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--network_dim", "8", "--xformers", "--network_args", "conv_dim=4", "conv_alpha=2",
                              "--learning_rate", "3e-4", "--resolution", "512,768", "--clip_skip", "2",
                              "--cache_latents", "false"])
    cfg = load_config(path, overrides_from_args(args))
    assert cfg.network_dim == 8 and cfg.xformers is True and cfg.cache_latents is False
    assert cfg.network_args == ["conv_dim=4", "conv_alpha=2"] and cfg.learning_rate == 3e-4
    assert cfg.datasets[0].resolution == (512, 768) and cfg.clip_skip == 2
    assert cfg.datasets[0].subsets[0].num_repeats == 5 and cfg.datasets[0].subsets[0].class_tokens == "sks dog"


def test_unknown_key_names_closest(tmp_path):
    path = _write(tmp_path, BASE + 'train_data_dir = "x"\nnetwork_dimm = 8\n')
    with pytest.raises(ConfigError, match=r"`network_dimm` is not a known option \(did you mean `network_dim`\?\)"):
        load_config(path)


def test_all_errors_reported_together(tmp_path):
    path = _write(tmp_path, BASE + 'train_data_dir = "x"\nnetwork_dim = "eight"\nlearning_rat = 1\n'
                  'network_train_unet_only = true\nnetwork_train_text_encoder_only = true\nmixed_precision = "fp8"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    for part in ("`network_dim` must be an integer, got 'eight'", "`learning_rat` is not a known option",
                 "network_train_text_encoder_only", "`mixed_precision` must be one of no, fp16, bf16"):
        assert part in msg


def test_required_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path` is required.*dataset_config` is required"):
        load_config(None, {})
    with pytest.raises(ConfigError, match="network_args"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "x", "network_args": ["rank=3"]})
    with pytest.raises(ConfigError, match="optimizer_type.*did you mean `AdamW8bit`"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "x", "optimizer_type": "adamw8bt"})
    with pytest.raises(ConfigError, match="sample_sampler` must be one of ddim, .*euler_a.*; got 'eular'"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": "x", "sample_sampler": "eular"})


def test_sd_scripts_config_file_tables_flattened(tmp_path):
    """An sd-scripts --config_file TOML (sections flattened) loads unchanged."""
    img = _images(tmp_path)
    ds = _write(tmp_path, f'[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = "{img / "5_sks dog"}"\n'
                'num_repeats = 3\n', "dataset.toml")
    path = _write(tmp_path, f"""
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"
v2 = false
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
no_half_vae = true
[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 0.0001
lr_scheduler = "cosine_with_restarts"
[dataset_arguments]
dataset_config = "{ds}"
train_batch_size = 2
[saving_arguments]
save_model_as = "safetensors"
[training_arguments]
mem_eff_attn = false
max_train_epochs = 4
""")
    cfg = load_config(path)
    assert cfg.network_dim == 16 and cfg.optimizer_type == "AdamW8bit" and cfg.max_train_epochs == 4
    assert cfg.datasets[0].resolution == (256, 256) and cfg.datasets[0].batch_size == 2
    assert cfg.datasets[0].subsets[0].num_repeats == 3


def test_unimplemented_sd_scripts_option_refused(tmp_path):
    path = _write(tmp_path, BASE + 'train_data_dir = "x"\nmem_eff_attn = true\n')
    with pytest.raises(ConfigError, match="`mem_eff_attn` is an sd-scripts option lora-sd does not implement"):
        load_config(path)


def test_inline_datasets_and_round_trip(tmp_path):
    img = _images(tmp_path)
    path = _write(tmp_path, BASE + f"""network_dim = 8
network_args = ["conv_dim=2"]
resolution = 128
[general]
shuffle_caption = true
[[datasets]]
batch_size = 3
[[datasets.subsets]]
image_dir = "{img / '5_sks dog'}"
num_repeats = 2
""")
    cfg = load_config(path)
    assert cfg.datasets[0].batch_size == 3 and cfg.datasets[0].resolution == (128, 128)
    assert cfg.datasets[0].subsets[0].shuffle_caption is True
    again = load_config(_write(tmp_path, config_toml(cfg), "resolved.toml"))
    for name in ("network_dim", "network_args", "pretrained_model_name_or_path", "learning_rate"):
        assert getattr(again, name) == getattr(cfg, name)
    assert again.datasets == cfg.datasets


def test_two_dataset_sources_refused(tmp_path):
    path = _write(tmp_path, BASE + 'train_data_dir = "x"\ndataset_config = "d.toml"\n')
    with pytest.raises(ConfigError, match="both given"):
        load_config(path)


def test_missing_dataset_config_file(tmp_path):
    path = _write(tmp_path, BASE + 'dataset_config = "nope.toml"\n')
    with pytest.raises(ConfigError, match="nope.toml: dataset config file not found"):
        load_config(path)


def test_unknown_command_line_flag_names_closest():
    from lora_sd.config import check_unknown_flags

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser)
    _, unknown = parser.parse_known_args(["--network_dimm", "8", "--xformers"])
    with pytest.raises(ConfigError, match=r"`--network_dimm` is not a known option \(did you mean `--network_dim`\?\)"):
        check_unknown_flags(unknown)
