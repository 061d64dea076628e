"""Caption files, shuffle with keep_tokens, dropout, tag frequency."""

import random

import pytest

from lora_sd.data.captions import find_caption, process_caption, read_caption_file, tag_counts
from lora_sd.data.dataset_config import SubsetConfig
from lora_sd.errors import DataError

CAPTION = "sks, dog, red collar, grass, sunny, outdoors"


def run(subset, caption=CAPTION, seed=0, epoch=1):
    return process_caption(caption, subset, random.Random(seed), epoch)


def test_plain_caption_is_unchanged():
    assert run(SubsetConfig()) == CAPTION


def test_shuffle_keeps_first_tokens_and_all_tags():
    sub = SubsetConfig(shuffle_caption=True, keep_tokens=2)
    outputs = {run(sub, seed=s) for s in range(20)}
    assert len(outputs) > 5  # it does shuffle
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags) == sorted(CAPTION.split(", "))


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    sub = SubsetConfig(shuffle_caption=True, keep_tokens_separator="|||")
    for s in range(10):
        tags = run(sub, "sks, dog ||| a, b, c, d ||| best quality", seed=s).split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-1] == "best quality"
        assert sorted(tags[2:-1]) == ["a", "b", "c", "d"]


def test_caption_dropout_rate():
    sub = SubsetConfig(caption_dropout_rate=0.5)
    outputs = [run(sub, seed=s) for s in range(400)]
    dropped = outputs.count("")
    assert 140 < dropped < 260 and set(outputs) == {"", CAPTION}
    assert run(SubsetConfig(caption_dropout_rate=1.0)) == ""


def test_caption_dropout_every_n_epochs():
    sub = SubsetConfig(caption_dropout_every_n_epochs=3)
    assert run(sub, epoch=3) == "" and run(sub, epoch=4) == CAPTION


def test_tag_dropout_spares_kept_tokens():
    sub = SubsetConfig(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = set()
    for s in range(50):
        tags = run(sub, seed=s).split(", ")
        assert tags[0] == "sks"
        lengths.add(len(tags))
    assert min(lengths) < 6 and max(lengths) <= 6


def test_prefix_suffix_secondary_separator_and_wildcards():
    sub = SubsetConfig(caption_prefix="photo of", caption_suffix="8k", secondary_separator=";;;")
    assert run(sub, "sks dog;;;grass") == "photo of sks dog,grass 8k"
    wild = SubsetConfig(enable_wildcard=True)
    outs = {run(wild, "a {red|blue} {{dog}}\nsecond line", seed=s) for s in range(40)}
    assert outs == {"a red {dog}", "a blue {dog}", "second line"}
    assert run(SubsetConfig(), "first line\nsecond line") == "first line"


def test_caption_files(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_text("from txt\n", encoding="utf-8")
    assert find_caption(image, ".caption") == tmp_path / "a.txt"  # .txt accepted as a fallback
    (tmp_path / "a.caption").write_text("from caption\nline two\n", encoding="utf-8")
    assert find_caption(image, ".caption") == tmp_path / "a.caption"
    assert read_caption_file(tmp_path / "a.caption") == "from caption"
    assert read_caption_file(tmp_path / "a.caption", enable_wildcard=True) == "from caption\nline two"
    assert find_caption(tmp_path / "b.png", ".caption") is None


def test_caption_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "bad.caption"
    path.write_bytes("caf\xe9, cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match="bad.caption.*not UTF-8"):
        read_caption_file(path)


def test_tag_counts():
    assert tag_counts(["A, b", "a,  c", ""]) == {"a": 2, "b": 1, "c": 1}
