"""Values refused at config load, each naming its option: non-finite numbers, impossible ranges, negative
alphas, an output_name that leaves output_dir, sd-scripts options accepted only where they change nothing."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from lora_sd.cli import run_main
from lora_sd.config import add_config_arguments, check_unknown_flags, load_config, overrides_from_args
from lora_sd.config.coerce import base_type
from lora_sd.config.options import TYPES
from lora_sd.data.dataset_config import load_dataset_config
from lora_sd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FLOATS = [name for name, typ in TYPES.items() if base_type(typ)[0] is float]


@pytest.fixture
def base(tmp_path):
    """A valid config's TOML lines (a model name and a DreamBooth folder; nothing is loaded)."""
    (tmp_path / "img" / "1_x").mkdir(parents=True)
    return f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "{tmp_path / "img"}"\n'


def _load(tmp_path, text):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return load_config(path)


def _cli(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    check_unknown_flags(unknown)
    return overrides_from_args(args)


@pytest.mark.parametrize("literal", ["inf", "-inf", "nan"])
def test_every_float_option_must_be_finite_in_toml(tmp_path, base, literal):
    assert {"learning_rate", "unet_lr", "noise_offset", "network_alpha", "network_multiplier"} <= set(FLOATS)
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, base + "".join(f"{name} = {literal}\n" for name in FLOATS))
    for name in FLOATS:
        assert f"`{name}` must be a finite number, got {float(literal)}" in str(e.value)


@pytest.mark.parametrize("name", FLOATS)
def test_every_float_option_must_be_finite_on_the_command_line(tmp_path, base, name):
    path = tmp_path / "train.toml"
    path.write_text(base)
    with pytest.raises(ConfigError, match=f"`{name}` must be a finite number, got nan"):
        load_config(path, _cli([f"--{name}", "nan"]))


@pytest.mark.parametrize("args, message", [
    (["conv_dim=4", "conv_alpha=inf"], "conv_alpha must be a finite number"),
    (["conv_dim=4", "conv_alpha=nan"], "conv_alpha must be a finite number"),
    (["conv_dim=4", "conv_alpha=-1"], "conv_alpha must be >= 0"),
    (["conv_dim=-4"], "conv_dim must be >= 0"),
    (["conv_dim=4.5"], "conv_dim must be an integer"),
])
def test_network_args_numbers(tmp_path, base, args, message):
    with pytest.raises(ConfigError, match=f"`network_args` {message}"):
        load_config(None, {"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path / "img"),
                           "network_args": args})


@pytest.mark.parametrize("arg", ["weight_decay=inf", "weight_decay=nan", "weight_decay=1e999", "betas=0.9,-inf"])
def test_optimizer_args_numbers_must_be_finite(tmp_path, base, arg):
    with pytest.raises(ConfigError, match=f"`optimizer_args` {arg.split('=')[0]} must be finite"):
        _load(tmp_path, base + f'optimizer_args = ["{arg}"]\n')


@pytest.mark.parametrize("line, message", [
    ("network_alpha = -1", "`network_alpha` must be >= 0, got -1.0"),
    ("noise_offset = -0.1", "`noise_offset` must be >= 0"),
    ("min_snr_gamma = 0", "`min_snr_gamma` must be > 0 when given"),
    ("caption_dropout_rate = 1.5", "`caption_dropout_rate` must be in [0, 1]"),
    ("caption_tag_dropout_rate = -0.1", "`caption_tag_dropout_rate` must be in [0, 1]"),
    ("vae_batch_size = 0", "`vae_batch_size` must be >= 1"),
    ("unet_lr = -1e-4", "`unet_lr` must be >= 0"),
    ("lr_scheduler_num_cycles = 0", "`lr_scheduler_num_cycles` must be >= 1"),
    ("keep_tokens = -1", "`keep_tokens` must be >= 0"),
    ("max_data_loader_n_workers = -1", "`max_data_loader_n_workers` must be >= 0"),
    ("seed = -1", "`seed` must be in [0, 4294967295]"),
    ("seed = 4294967296", "`seed` must be in [0, 4294967295]"),
])
def test_impossible_values_refused(tmp_path, base, line, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, base + line + "\n")
    assert message in str(e.value)


def test_zero_alphas_stay_allowed(tmp_path, base):
    cfg = _load(tmp_path, base + 'network_alpha = 0\nnetwork_args = ["conv_dim=2", "conv_alpha=0"]\n')
    assert cfg.network_alpha == 0 and cfg.network_args == ["conv_dim=2", "conv_alpha=0"]


def test_dataset_numbers_must_be_finite(tmp_path):
    path = tmp_path / "dataset.toml"
    path.write_text(f'[[datasets]]\nnetwork_multiplier = inf\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n'
                    'caption_dropout_rate = nan\n')
    with pytest.raises(ConfigError) as e:
        load_dataset_config(path)
    assert "`datasets[0].network_multiplier` must be a finite number, got inf" in str(e.value)
    assert "`datasets[0].subsets[0].caption_dropout_rate` must be a finite number, got nan" in str(e.value)


BAD_NAMES = ["../../x", "../x", "a/b", "a\\b", "/tmp/x", "..", ".", ""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_output_name_must_stay_in_output_dir(tmp_path, base, name):
    with pytest.raises(ConfigError, match="`output_name` must be a plain file name without a path"):
        _load(tmp_path, base + f'output_dir = "{tmp_path / "out"}"\noutput_name = {json.dumps(name)}\n')


@pytest.mark.parametrize("prefix", ["../../x", "/abs", "a/b", ".."])
def test_log_prefix_stays_in_logging_dir(tmp_path, base, prefix):
    """log_prefix starts the run's folder name under logging_dir: a path there would write logs elsewhere."""
    with pytest.raises(ConfigError, match="`log_prefix` must be a plain file name without a path"):
        _load(tmp_path, base + f'logging_dir = "{tmp_path / "logs"}"\nlog_prefix = {json.dumps(prefix)}\n')
    assert _load(tmp_path, base + 'log_prefix = "char-"\n').log_prefix == "char-"


def test_output_name_resolving_elsewhere_refused(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="`output_name` 'lora' resolves outside `output_dir`"):
        _load(tmp_path, base + f'output_dir = "{out}"\noutput_name = "lora"\n')
    assert _load(tmp_path, base + f'output_dir = "{out}"\noutput_name = "lora2"\n').output_name == "lora2"


def test_train_recipe_refuses_bad_output_name(tmp_path, base, capsys):
    """One error line, exit 2, nothing written (the check runs before any model loads)."""
    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    before = sorted(tmp_path.rglob("*"))
    code = run_main(recipe.main, ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path / "img"),
                                  "--output_dir", str(tmp_path / "out" / "sub"), "--output_name", "../../x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "`output_name`" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_sd_scripts_config_file_with_vae_batch_size_and_multiplier(tmp_path):
    """An sd-scripts --config_file TOML carrying vae_batch_size loads; a dataset's network_multiplier is kept."""
    img = tmp_path / "img"
    img.mkdir()
    ds = tmp_path / "dataset.toml"
    ds.write_text(f'[[datasets]]\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = "{img}"\n')
    cfg = _load(tmp_path, f'[model_arguments]\npretrained_model_name_or_path = "m"\n[dataset_arguments]\n'
                f'dataset_config = "{ds}"\nvae_batch_size = 4\ncache_latents = true\n'
                '[training_arguments]\nsave_state_on_train_end = true\n[additional_network_arguments]\n'
                'network_multiplier = 0.8\n')
    assert cfg.vae_batch_size == 4 and cfg.save_state_on_train_end and cfg.network_multiplier == 0.8
    assert cfg.datasets[0].network_multiplier == 0.5


def test_network_multiplier_is_not_a_dataset_default(tmp_path):
    """Training multiplies the option by the dataset's own value: a dataset without one keeps 1.0 (else 0.5 x 0.5)."""
    img = tmp_path / "img"
    img.mkdir()
    cfg = _load(tmp_path, f'pretrained_model_name_or_path = "m"\nnetwork_multiplier = 0.5\n'
                f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}"\n')
    assert cfg.network_multiplier == 0.5 and cfg.datasets[0].network_multiplier == 1.0


def test_sd_scripts_options_only_where_they_change_nothing(tmp_path, base):
    """store_true flags of sd-scripts parse on our command line; a value that would change the run is refused."""
    path = tmp_path / "train.toml"
    path.write_text(base)
    cfg = load_config(path, _cli(["--no_half_vae", "--mem_eff_attn", "false"]))
    assert cfg.pretrained_model_name_or_path == "m"
    with pytest.raises(ConfigError, match="`mem_eff_attn` is an sd-scripts option lora-sd does not implement"):
        load_config(path, _cli(["--mem_eff_attn"]))
    with pytest.raises(ConfigError, match="`save_n_epoch_ratio` is an sd-scripts option"):
        _load(tmp_path, base + "save_n_epoch_ratio = 2\n")
    with pytest.raises(ConfigError, match='`log_with` = "tensorboard" needs `logging_dir`'):
        _load(tmp_path, base + 'log_with = "tensorboard"\n')
    assert _load(tmp_path, base + f'log_with = "tensorboard"\nlogging_dir = "{tmp_path}"\n').logging_dir
