"""Model folders and files we write: transformers 4's text-encoder names, and nothing partial on a full disk."""

import errno
import shutil

import pytest
import torch
from safetensors import safe_open

from lora_sd.models import load_base, save_diffusers, save_single_file
from tests.helpers import model_outputs, text_ids


def test_diffusers_folder_uses_transformers_4_text_encoder_names(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    folder = save_diffusers(tiny, tmp_path / "model")
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    own = {k.removeprefix("text_model.") for k in tiny.text_encoder.state_dict()}  # 5 drops the level
    assert keys == {f"text_model.{k}" for k in own}  # text_model.embeddings..., .encoder.layers.0..., .final_layer_norm
    te, info = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), output_loading_info=True)
    assert not any(info.values())  # transformers 5 maps the names: nothing missing, nothing unexpected
    expected_te, expected_unet = model_outputs(tiny)
    ids = text_ids(tiny)
    with torch.no_grad():
        assert torch.equal(te(ids)[0], expected_te)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        assert torch.equal(pipe.text_encoder(ids)[0], expected_te)
    got_te, got_unet = model_outputs(load_base(folder))
    assert torch.equal(got_te, expected_te) and torch.equal(got_unet, expected_unet)
    again = save_diffusers(load_base(folder), tmp_path / "again")  # loaded by from_pretrained: no second level
    with safe_open(str(again / "text_encoder" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys


def test_diffusers_folder_tokenizer_has_vocab_and_merges(tiny, tmp_path):
    """transformers 4's CLIPTokenizer (the class model_index.json names) reads only vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    folder = save_diffusers(tiny, tmp_path / "model")
    only_legacy = tmp_path / "legacy_tokenizer"
    only_legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / "tokenizer" / name, only_legacy / name)
    tokenizer = CLIPTokenizer.from_pretrained(str(only_legacy))
    for prompt in ("a photo of a cat", "sks dog, upper body"):
        assert text_ids(tiny, prompt).tolist() == tokenizer(
            [prompt], padding="max_length", max_length=77).input_ids


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def full_disk_after(monkeypatch, calls: int):
    """safetensors' save_file (diffusers and our single files use it) writes part of a file, then ENOSPC."""
    import safetensors.torch

    real, count = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        count.append(filename)
        if len(count) > calls:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return count


def test_save_diffusers_leaves_nothing_partial_on_a_full_disk(tiny_sd1, tmp_path, monkeypatch):
    old = save_diffusers(tiny_sd1, tmp_path / "out" / "model")
    (old / "mine.txt").write_text("the folder as it was")
    before = snapshot(tmp_path / "out")
    count = full_disk_after(monkeypatch, 1)  # the U-Net written, the VAE fails
    with pytest.raises(OSError, match="No space left"):
        save_diffusers(tiny_sd1, old)
    assert len(count) == 2 and snapshot(tmp_path / "out") == before  # old folder intact, no temporaries
    with pytest.raises(OSError):
        save_diffusers(tiny_sd1, tmp_path / "out" / "new")
    assert snapshot(tmp_path / "out") == before


def test_save_single_file_leaves_nothing_partial_on_a_full_disk(tiny_sd1, tmp_path, monkeypatch):
    path = save_single_file(tiny_sd1, tmp_path / "model.safetensors")
    before = snapshot(tmp_path)
    full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError, match="No space left"):
        save_single_file(tiny_sd1, path)
    with pytest.raises(OSError, match="No space left"):
        save_single_file(tiny_sd1, tmp_path / "other.safetensors")
    assert snapshot(tmp_path) == before
