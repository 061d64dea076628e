"""The offline CLIP tokenizer built from openai-clip's BPE file gives CLIP's real ids."""

import importlib.util

import pytest

from lora_sd.models.tokenizer import VOCAB_SIZE, clip_tokenizer_folder, find_bpe_file, load_clip_tokenizer

BOS, EOS = 49406, 49407

# Reference ids of the real CLIP tokenizer (openai/clip-vit-large-patch14).
KNOWN = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "masterpiece, best quality, 1girl, in white shirt": [12066, 267, 949, 3027, 267, 272, 1611, 267, 530, 1579, 2523],
}

# Punctuation, weights syntax, unicode, odd spacing, numbers: compared with openai-clip's own tokenizer.
STRINGS = [
    "Hello, World!!! (sks:1.2) [dog] {cat}",
    "café naïve 日本語 🙂 émoji, Ωmega",
    "it's don't  we'll   X-ray -- ok?",
    "a  \t  b\n c  ",
    "1234567 3.14 $100 #tag @user 50%",
    "<|endoftext|> tag",
    "ALL CAPS and MiXeD CaSe",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_sd_cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return load_clip_tokenizer("sd1", cache=cache)


@pytest.fixture(scope="module")
def reference():
    """openai-clip's SimpleTokenizer, loaded from its file (importing `clip` needs torchvision)."""
    pytest.importorskip("ftfy")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", find_bpe_file().parent / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(find_bpe_file()))


def test_files_are_cached_once(cache):
    folder = clip_tokenizer_folder(cache)
    assert folder.parent == cache and (folder / "vocab.json").is_file()
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_folder(cache) == folder and (folder / "vocab.json").stat().st_mtime_ns == mtime


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from lora_sd.models.tokenizer import cache_dir

    monkeypatch.delenv("LORA_SD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "lora_sd"
    monkeypatch.setenv("LORA_SD_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids(tokenizer, text):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer(text).input_ids == [BOS] + KNOWN[text] + [EOS]


@pytest.mark.parametrize("text", STRINGS)
def test_same_ids_as_openai_clip(tokenizer, reference, text):
    assert tokenizer(text).input_ids == [BOS] + reference.encode(text) + [EOS]


def test_long_prompt_truncates_to_77(tokenizer, reference):
    text = ", ".join(["masterpiece", "best quality", "a photo of a cat on a red sofa"] * 12)
    full = tokenizer(text).input_ids
    assert full == [BOS] + reference.encode(text) + [EOS] and len(full) > 77
    ids = tokenizer(text, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[:76] == full[:76] and ids[-1] == EOS


@pytest.mark.parametrize("version,pad_id", [("sd1", EOS), ("sd2", 0)])
def test_padding_per_version(cache, version, pad_id):
    tok = load_clip_tokenizer(version, cache=cache)
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:7] == [BOS] + KNOWN["a photo of a cat"] + [EOS] and set(ids[7:]) == {pad_id}
