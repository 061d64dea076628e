"""Outputs of merge_lora, svd_merge_lora, extract_lora_from_models and generate: an output that is an
input (or inside one) is refused before any work, and an output that cannot be written (a path under a
file, a read-only folder, a full disk) is one `error:` line, exit 2, with nothing partial left."""

import errno
import hashlib
import os
from pathlib import Path

import pytest

import recipes.extract_lora_from_models as extract_recipe
import recipes.generate as generate_recipe
import recipes.merge_lora as merge_recipe
import recipes.svd_merge_lora as svd_recipe
from lora_sd.formats import save_lora
from lora_sd.tiny import save_tiny_diffusers, save_tiny_single_file
from tests.helpers import one_error_line as _one_error
from tests.helpers import random_lora


@pytest.fixture(scope="module")
def inputs(tiny_sd1, tmp_path_factory):
    """LoRA files a, b; a single-file model (+ its config folder); a diffusers model folder; a tuned folder."""
    d = tmp_path_factory.mktemp("outputs")
    for name, seed in (("a", 1), ("b", 2)):
        save_lora(random_lora(tiny_sd1, 4, 2, seed=seed, scale=0.3), d / f"{name}.safetensors", version="sd1")
    single, config = save_tiny_single_file(d / "model.safetensors", "sd1")
    folder = save_tiny_diffusers(d / "model_dir", "sd1")
    tuned = save_tiny_diffusers(d / "tuned_dir", "sd1", seed=1)
    return dict(dir=d, a=d / "a.safetensors", b=d / "b.safetensors", single=single, config=config,
                folder=folder, tuned=tuned)


def _digest(path):
    """Hash of a file, or of every file (name and bytes) under a folder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def no_work(monkeypatch):
    """Reading a LoRA or a model fails the test: a refused output must be refused before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("an input was read before the output was checked")

    monkeypatch.setattr("lora_sd.ops.gather.load_lora", refuse)
    monkeypatch.setattr("lora_sd.models.load_base", refuse)


def _cases(s):
    """(recipe, argv, the input the output would destroy) per way of writing over an input."""
    lora_merge = ["--models", s["a"], s["b"]]
    into_single = ["--sd_model", s["single"], "--model_config", s["config"], "--models", s["a"]]
    into_folder = ["--sd_model", s["folder"], "--models", s["a"]]
    extract = ["--model_org", s["single"], "--model_config", s["config"], "--model_tuned", s["tuned"], "--dim", "2"]
    gen = ["--ckpt", s["folder"], "--prompt", "x", "--W", "32", "--H", "32", "--steps", "1", "--device", "cpu",
           "--network_weights", s["a"]]
    return {
        "lora+lora onto a LoRA": (merge_recipe, [*lora_merge, "--save_to", s["b"]], s["b"]),
        "model file onto itself": (merge_recipe, [*into_single, "--save_to", s["single"]], s["single"]),
        "model file onto a LoRA": (merge_recipe, [*into_single, "--save_to", s["a"]], s["a"]),
        "model into its config folder": (merge_recipe, [*into_single, "--save_to", s["config"] / "m.ckpt"], s["config"]),
        "model folder in place": (merge_recipe, [*into_folder, "--save_to", s["folder"]], s["folder"]),
        "model into its own folder": (merge_recipe, [*into_folder, "--save_to", s["folder"] / "unet" / "m.safetensors"],
                                      s["folder"]),
        "folder holding the inputs": (merge_recipe, [*into_folder, "--save_to", s["dir"]], s["folder"]),
        "svd onto a LoRA": (svd_recipe, [*lora_merge, "--new_rank", "2", "--save_to", s["a"]], s["a"]),
        "extract onto model_org": (extract_recipe, [*extract, "--save_to", s["single"]], s["single"]),
        "extract onto model_tuned": (extract_recipe, [*extract, "--save_to", s["tuned"]], s["tuned"]),
        "extract into model_tuned": (extract_recipe, [*extract, "--save_to", s["tuned"] / "x.safetensors"], s["tuned"]),
        "images into the model folder": (generate_recipe, [*gen, "--outdir", s["folder"]], s["folder"]),
        "images under the model folder": (generate_recipe, [*gen, "--outdir", s["folder"] / "samples"], s["folder"]),
        "images under a LoRA file": (generate_recipe, [*gen, "--outdir", s["a"]], s["a"]),
    }


KEYS = ("dir", "a", "b", "single", "config", "folder", "tuned")
CASES = list(_cases(dict.fromkeys(KEYS, Path("x"))))


@pytest.mark.parametrize("case", CASES)
def test_output_onto_an_input_is_refused_before_any_work(inputs, no_work, capsys, case):
    recipe, argv, victim = _cases(inputs)[case]
    before = {p: _digest(p) for p in inputs["dir"].iterdir()}
    error = _one_error(recipe, argv, capsys)
    option = "--outdir" if recipe is generate_recipe else "--save_to"
    assert error.startswith(f"error: {option} ") and str(victim) in error, error
    assert {p: _digest(p) for p in inputs["dir"].iterdir()} == before  # no input changed, nothing added


def test_a_link_to_an_input_is_refused(inputs, no_work, tmp_path, capsys):
    link = tmp_path / "link.safetensors"
    link.symlink_to(inputs["a"])
    before = _digest(inputs["a"])
    error = _one_error(merge_recipe, ["--models", inputs["a"], inputs["b"], "--save_to", link], capsys)
    assert "is the input" in error and _digest(inputs["a"]) == before


# --- outputs that cannot be written -------------------------------------------------------------


def _writes(s, out):
    """(recipe, argv) of every writer: LoRA+LoRA (both modes), SVD merge, extraction, merged models."""
    lora_merge = ["--models", s["a"], s["b"]]
    into_single = ["--sd_model", s["single"], "--model_config", s["config"], "--models", s["a"]]
    return {
        "merge exact": (merge_recipe, [*lora_merge, "--save_to", out / "m.safetensors"]),
        "merge kohya": (merge_recipe, [*lora_merge, "--concat", "false", "--save_to", out / "m.safetensors"]),
        "svd merge": (svd_recipe, [*lora_merge, "--new_rank", "2", "--save_to", out / "m.safetensors"]),
        "extract": (extract_recipe, ["--model_org", s["single"], "--model_config", s["config"],
                                     "--model_tuned", s["tuned"], "--dim", "2", "--save_to", out / "x.safetensors"]),
        "model single file": (merge_recipe, [*into_single, "--save_to", out / "m.safetensors"]),
        "model ckpt": (merge_recipe, [*into_single, "--save_to", out / "m.ckpt"]),
        "model folder": (merge_recipe, [*into_single, "--save_to", out / "merged"]),
    }


WRITERS = list(_writes(dict.fromkeys(KEYS, Path("x")), Path("x")))


@pytest.mark.parametrize("writer", WRITERS)
def test_output_under_a_file_is_refused_before_any_work(inputs, no_work, tmp_path, capsys, writer):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    recipe, argv = _writes(inputs, blocker / "sub")[writer]
    error = _one_error(recipe, argv, capsys)
    assert f"{blocker} is a file, not a folder" in error
    assert blocker.read_text() == "mine" and os.listdir(tmp_path) == ["a_file"]


def _failing_writers(exc):
    """(file writer, folder writer) that leave half a file where they were told to write, then fail."""

    def write_file(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a file")
        raise exc

    def write_folder(pipeline, target, *args, **kwargs):
        (Path(target) / "unet").mkdir(parents=True)
        write_file(None, Path(target) / "unet" / "diffusion_pytorch_model.safetensors")

    return write_file, write_folder


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied")], ids=["disk full", "read-only"])
@pytest.mark.parametrize("writer", WRITERS)
def test_failed_write_is_one_line_and_leaves_nothing(inputs, tmp_path, monkeypatch, capsys, writer, exc):
    """Every writer goes through io.atomic_path: a failure inside the write leaves no partial output."""
    import diffusers
    import safetensors.torch
    import torch

    write_file, write_folder = _failing_writers(exc)
    monkeypatch.setattr(safetensors.torch, "save_file", write_file)
    monkeypatch.setattr(torch, "save", write_file)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", write_folder)
    out = tmp_path / "out"
    out.mkdir()
    recipe, argv = _writes(inputs, out)[writer]
    error = _one_error(recipe, argv, capsys)
    assert exc.strerror in error
    assert os.listdir(out) == []  # no output, no temporary
