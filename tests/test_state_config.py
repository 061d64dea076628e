"""The resolved config written beside a run's outputs (checkpoint.config_toml) loads back unchanged."""

from lora_sd.config import load_config
from lora_sd.training.resolved_config import config_toml

TRICKY = 'C:\\xl\\new "quoted" \\u0041 tab\tline\nend \x7f é 日本'


def test_strings_that_need_escapes_round_trip(tmp_path):
    """toml 0.10.2 alone writes `\\x` unescaped and fails on DEL; what we write loads back as it was."""
    images = tmp_path / "img" / "5_sks \\xdog"
    images.mkdir(parents=True)
    (tmp_path / "train.toml").write_text(f'pretrained_model_name_or_path = "model"\n'
                                         f'train_data_dir = "{(tmp_path / "img").as_posix()}"\n'.replace("\\", "\\\\"))
    cfg = load_config(tmp_path / "train.toml")
    cfg.training_comment = TRICKY
    cfg.datasets[0].subsets[0].caption_prefix = TRICKY
    (tmp_path / "resolved.toml").write_text(config_toml(cfg), encoding="utf-8")
    again = load_config(tmp_path / "resolved.toml")
    assert again.training_comment == TRICKY and again.datasets == cfg.datasets
    assert again.datasets[0].subsets[0].image_dir.endswith("5_sks \\xdog")
