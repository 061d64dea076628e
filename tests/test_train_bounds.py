"""Values that only overflow, exhaust memory or fail deep inside torch are refused as one line naming the option:
integers beyond 64 bits, resolutions no VAE can encode (or that no memory holds), and options bounded by the
loaded model (clip_skip above its layer count, a rank above every targeted layer's)."""

from types import SimpleNamespace

import pytest

from lora_sd.config import load_config
from lora_sd.config.coerce import base_type
from lora_sd.config.options import TYPES
from lora_sd.data.dataset_config import load_dataset_config
from lora_sd.errors import ConfigError
from lora_sd.targets import NetworkSpec, lora_configs
from lora_sd.training.network import check_fits_model

INTS = [name for name, typ in TYPES.items() if base_type(typ)[0] is int]


def _base(tmp_path):
    (tmp_path / "img" / "1_x").mkdir(parents=True, exist_ok=True)
    return {"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path / "img")}


@pytest.mark.parametrize("from_cli", [False, True])
def test_every_integer_option_must_fit_in_64_bits(tmp_path, from_cli):
    """10**20 steps of gradient accumulation was an OverflowError traceback inside torch."""
    assert {"gradient_accumulation_steps", "network_dim", "max_train_steps", "train_batch_size"} <= set(INTS)
    huge = 10**20
    overrides = {**_base(tmp_path), **{name: str(huge) if from_cli else huge for name in INTS}}
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for name in INTS:
        assert f"`{name}` must be an integer of at most {2**63 - 1}, got {huge}" in str(e.value)
    load_config(None, {**_base(tmp_path), "max_train_steps": 2**63 - 1})  # the largest is fine


@pytest.mark.parametrize("value", ["1", "4,64", "100000", "64,9000"])
def test_resolution_outside_what_a_vae_encodes_is_refused_in_both_configs(tmp_path, value):
    """1x1 was a convolution traceback at the first step; 100000 was killed for memory while resizing."""
    with pytest.raises(ConfigError, match="`resolution` must have sides from 8 to 8192 pixels"):
        load_config(None, {**_base(tmp_path), "resolution": value})
    with pytest.raises(ConfigError, match=r"`datasets\[0\].resolution|resolution` must have sides from 8 to 8192"):
        load_dataset_config({"datasets": [{"resolution": value, "subsets": [{"image_dir": str(tmp_path)}]}]})
    assert load_config(None, {**_base(tmp_path), "resolution": "8,8192"}).resolution == (8, 8192)


def _fit(tiny, **options):
    cfg = SimpleNamespace(**{"clip_skip": None, "network_dim": 4, "conv_dim": None, **options})
    spec = NetworkSpec(cfg.network_dim, 1.0, cfg.conv_dim, 1.0)
    models = {"unet": tiny.unet, "text_encoder": tiny.text_encoder}
    check_fits_model(cfg, tiny, models, lora_configs(tiny.unet, tiny.text_encoder, spec))


def test_options_bounded_by_the_model_are_refused_before_any_adapter(tiny_sd1):
    layers = tiny_sd1.text_encoder.config.num_hidden_layers
    _fit(tiny_sd1, clip_skip=layers)
    with pytest.raises(ConfigError, match=f"`clip_skip` {layers + 1} is above the text encoder's {layers} layers"):
        _fit(tiny_sd1, clip_skip=layers + 1)  # was an IndexError at the first step
    widest = max(min(m.weight.shape[0], m.weight[0].numel()) for m in tiny_sd1.text_encoder.modules()
                 if type(m).__name__ == "Linear")
    _fit(tiny_sd1, network_dim=widest)  # the widest layer can still use it
    with pytest.raises(ConfigError, match=f"`network_dim` 100000 is above the rank of every layer .*at most {widest}"):
        _fit(tiny_sd1, network_dim=100000)  # was gigabytes of weights
    with pytest.raises(ConfigError, match="`conv_dim` 100000 is above the rank of every layer"):
        _fit(tiny_sd1, conv_dim=100000)


@pytest.mark.parametrize("raw, label", [
    ({"datasets": [{"subsets": 3}]}, "`datasets[0].subsets` must hold at least one [[datasets.subsets]] table, got 3"),
    ({"datasets": [1, 2]}, "`datasets` must hold at least one [[datasets]] table, got [1, 2]"),
    ({"datasets": [{"subsets": ["img"]}]}, "`datasets[0].subsets` must hold at least one [[datasets.subsets]] "
                                           "table, got ['img']"),
    ({"general": 5, "datasets": [{"subsets": [{"image_dir": "x"}]}]}, "`general` must be a [general] table, got 5"),
])
def test_a_dataset_toml_of_another_shape_is_one_line(raw, label):
    """Each was a TypeError or AttributeError traceback."""
    with pytest.raises(ConfigError) as e:
        load_dataset_config(raw)
    assert label in str(e.value)


@pytest.mark.parametrize("entry, problem", [
    ({"caption": 5}, "'0' `caption` must be a string, got int"),
    ({"caption": "a", "tags": ["x", "y"]}, "'0' `tags` must be a string, got list"),
    ("a caption", "the entry for '0' must be an object"),
    (None, "the entry for '0' must be an object"),
    ({"caption": None}, "'0' has neither `caption` nor `tags`"),
])
def test_a_metadata_entry_of_another_shape_is_one_line(tmp_path, entry, problem):
    """Tracebacks (an int caption, a list of tags), or training on an empty caption with exit 0 (a string or null
    entry): sd-scripts requires a caption or tags."""
    import json

    from PIL import Image

    from lora_sd.data.index import build_index
    from lora_sd.errors import DataError

    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    (tmp_path / "meta.json").write_text(json.dumps({"0": entry}))
    configs = load_dataset_config({"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(tmp_path), "metadata_file": str(tmp_path / "meta.json")}]}]})
    with pytest.raises(DataError, match=f"`metadata_file` {tmp_path / 'meta.json'}: {problem}"):
        build_index(configs)


def test_an_epoch_too_large_to_hold_is_refused_before_it_is_built():
    """num_repeats = 10**18 was a MemoryError traceback while the sampler listed the epoch."""
    from lora_sd.data.sampler import MAX_EPOCH_SAMPLES, BucketBatchSampler
    from lora_sd.errors import DataError

    with pytest.raises(DataError, match=r"an epoch of 1000000000000000001 samples .* lower `num_repeats`"):
        BucketBatchSampler([0, 0], [(64, 64)] * 2, [10**18, 1], [1], seed=0)
    assert len(BucketBatchSampler([0], [(64, 64)], [3], [2], seed=0)) == 2 and MAX_EPOCH_SAMPLES >= 10**7


@pytest.mark.parametrize("key", ["global_step", "epoch", "batches_in_epoch"])
@pytest.mark.parametrize("value", [-3, 1.7, True, 10**30, "2"])
def test_a_hand_edited_progress_counter_is_refused(key, value):
    """state.json's counters were read with int(): -3 trained past the end with exit 0, 1.7 and true were
    truncated silently, 10**30 reported "trained 10**30 steps"."""
    from lora_sd.training.checkpoint import Progress

    saved = {"global_step": 4, "epoch": 1, "batches_in_epoch": 2}
    progress = Progress()
    progress.load_state_dict(saved)
    assert progress.state_dict() == saved
    with pytest.raises(ValueError, match=f"`{key}` must be an integer from 0 to {2**63 - 1}, got {value!r}"):
        progress.load_state_dict({**saved, key: value})
