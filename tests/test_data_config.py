"""Dataset config: sd-scripts keys, inheritance, folder convention, and the errors."""

from pathlib import Path

import pytest
from PIL import Image

from lora_sd.data import DatasetConfig, dreambooth_dataset_config, load_dataset_config
from lora_sd.errors import ConfigError, DataError, LoraSdError

REPO = Path(__file__).resolve().parents[1]


def write_toml(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_inheritance_general_dataset_subset(tmp_path):
    path = write_toml(tmp_path, """
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = "txt"
resolution = 640

[[datasets]]
resolution = [768, 512]
batch_size = 3
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 5

  [[datasets.subsets]]
  image_dir = "b"
  keep_tokens = 0
  shuffle_caption = false
  is_reg = true

[[datasets]]
enable_bucket = true
  [[datasets.subsets]]
  image_dir = "c"
""")
    first, second = load_dataset_config(path)
    assert first.resolution == (768, 512) and first.batch_size == 3
    a, b = first.subsets
    assert (a.num_repeats, a.keep_tokens, a.shuffle_caption, a.is_reg) == (5, 1, True, False)
    assert (b.num_repeats, b.keep_tokens, b.shuffle_caption, b.is_reg) == (1, 0, False, True)
    assert a.caption_extension == ".txt"  # the dot is added, as sd-scripts does
    # the second dataset inherits resolution from [general] and defaults from sd-scripts
    assert second.resolution == (640, 640) and second.enable_bucket
    assert (second.min_bucket_reso, second.max_bucket_reso, second.bucket_reso_steps) == (256, 1024, 64)
    assert second.subsets[0].keep_tokens == 2


def test_parsed_dict_and_defaults():
    raw = {"datasets": [{"subsets": [{"image_dir": "x"}]}]}
    (ds,) = load_dataset_config(raw, defaults={"resolution": [512, 768], "flip_aug": True, "unrelated": 1})
    assert ds.resolution == (512, 768) and ds.subsets[0].flip_aug
    assert ds.subsets[0].caption_extension == ".caption"
    (ds,) = load_dataset_config(raw, defaults={"resolution": "768,512"})  # sd-scripts' --resolution form
    assert ds.resolution == (768, 512)


def test_example_config_loads():
    configs = load_dataset_config(REPO / "configs" / "dataset_example.toml")
    assert len(configs) == 2 and all(isinstance(c, DatasetConfig) for c in configs)
    assert configs[0].subsets[1].is_reg and configs[1].subsets[0].metadata_file


@pytest.mark.parametrize("text, key", [
    ("[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'", "general.shufle_caption"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeat = 2", "datasets[0].subsets[0].num_repeat"),
    ("[[datasets]]\nimage_dir='a'\n[[datasets.subsets]]\nimage_dir='a'", "datasets[0].image_dir"),
])
def test_unknown_keys_name_key_and_file(tmp_path, text, key):
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and "\n" not in msg


def test_unknown_key_suggests_close_match(tmp_path):
    path = write_toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeat = 2")
    with pytest.raises(ConfigError, match="did you mean `num_repeats`"):
        load_dataset_config(path)


@pytest.mark.parametrize("dataset, subset, key", [
    ("", "num_repeats = 0", "num_repeats"),
    ("", "num_repeats = -3", "num_repeats"),
    ("", "caption_dropout_rate = 1.5", "caption_dropout_rate"),
    ("", "num_repeats = 'ten'", "num_repeats"),
    ("", "flip_aug = 1", "flip_aug"),
    ("resolution = [512]", "", "resolution"),
    ("resolution = 0", "", "resolution"),
    ("batch_size = 0", "", "batch_size"),
    ("bucket_reso_steps = 30", "", "bucket_reso_steps"),
    ("enable_bucket = true\nmin_bucket_reso = 1024\nmax_bucket_reso = 512", "", "min_bucket_reso"),
    ("enable_bucket = true\nmin_bucket_reso = 640", "", "min_bucket_reso"),
    ("enable_bucket = true\nresolution = [1280, 512]", "", "max_bucket_reso"),
    ("enable_bucket = true\nresolution = 64\nbucket_reso_steps = 128", "", "bucket_reso_steps"),
    ("face_crop_aug_range = [2.0, 4.0]", "", "face_crop_aug_range"),
])
def test_impossible_values_are_one_line_errors(tmp_path, dataset, subset, key):
    path = write_toml(tmp_path, f"[[datasets]]\n{dataset}\n[[datasets.subsets]]\nimage_dir='a'\n{subset}\n")
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    msg = str(err.value)
    assert f"{key}`" in msg and str(path) in msg and "\n" not in msg


def test_all_errors_reported_together(tmp_path):
    path = write_toml(tmp_path, "[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeats=0\n")
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    assert "batch_size" in str(err.value) and "num_repeats" in str(err.value)


def test_subset_needs_image_dir_and_no_mixed_styles(tmp_path):
    path = write_toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n")
    with pytest.raises(ConfigError, match="image_dir"):
        load_dataset_config(path)
    path = write_toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n"
                                "[[datasets.subsets]]\nmetadata_file='m.json'\n")
    with pytest.raises(ConfigError, match="mixes DreamBooth"):
        load_dataset_config(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_dataset_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not a valid TOML"):
        load_dataset_config(write_toml(tmp_path, "[[datasets]\n"))


def test_dreambooth_folder_convention(tmp_path):
    for folder in ("train/10_sks dog", "train/2_sks_cat", "train/notes", "reg/1_dog"):
        (tmp_path / folder).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train/10_sks dog/a.png")
    (ds,) = dreambooth_dataset_config(tmp_path / "train", tmp_path / "reg", resolution=768, enable_bucket=True)
    subs = {Path(s.image_dir).name: s for s in ds.subsets}
    assert set(subs) == {"10_sks dog", "2_sks_cat", "1_dog"}  # "notes" has no repeat count
    assert (subs["10_sks dog"].num_repeats, subs["10_sks dog"].class_tokens) == (10, "sks dog")
    assert subs["2_sks_cat"].class_tokens == "sks_cat"  # only the first "_" separates the count
    assert subs["1_dog"].is_reg and not subs["10_sks dog"].is_reg
    assert ds.resolution == (768, 768) and ds.enable_bucket


def test_dreambooth_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        dreambooth_dataset_config(tmp_path / "missing")
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="10_sks dog"):
        dreambooth_dataset_config(tmp_path / "train")
    (tmp_path / "train" / "0_x").mkdir()
    with pytest.raises(LoraSdError, match="num_repeats"):
        dreambooth_dataset_config(tmp_path / "train")


def test_sd_scripts_config_with_its_other_keys_loads(tmp_path):
    path = write_toml(tmp_path, """
[general]
enable_bucket = true
caption_separator = ","
keep_tokens_separator = "|||"
caption_prefix = "masterpiece"
cache_info = true
token_warmup_step = 0
face_crop_aug_range = []

[[datasets]]
resolution = "768,512"
network_multiplier = 0.5
caption_dropout_every_n_epochs = 3
  [[datasets.subsets]]
  image_dir = "a"
  secondary_separator = ";;;"
  enable_wildcard = true
""")
    with pytest.raises(ConfigError, match="face_crop_aug_range"):
        load_dataset_config(path)  # an empty range is still a range we do not implement
    path.write_text(path.read_text().replace("face_crop_aug_range = []\n", ""))
    (ds,) = load_dataset_config(path)
    sub = ds.subsets[0]
    assert ds.resolution == (768, 512) and ds.network_multiplier == 0.5
    assert (sub.keep_tokens_separator, sub.caption_prefix, sub.caption_dropout_every_n_epochs) == ("|||", "masterpiece", 3)
    assert sub.enable_wildcard and sub.secondary_separator == ";;;"
