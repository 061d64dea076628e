"""The file tools (merge, SVD merge, extract, convert, generate, resize) on hostile inputs: each bad LoRA file,
output path, option or model is one `error:` line (exit 2) naming it, with nothing written; or a correct result
that says what it did. One test per class of input; the cases are the ones a probe of the tools found."""

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import recipes.convert_lora as convert_recipe
import recipes.extract_lora_from_models as extract_recipe
import recipes.generate as generate_recipe
import recipes.merge_lora as merge_recipe
import recipes.resize_images_to_resolution as resize_recipe
import recipes.svd_merge_lora as svd_recipe
from lora_sd.errors import ConfigError
from lora_sd.formats import save_lora
from lora_sd.ops.args import resolve_device
from lora_sd.tiny import save_tiny_diffusers, save_tiny_single_file
from tests.helpers import one_error_line as _one_error
from tests.helpers import random_lora


@pytest.fixture(scope="module")
def files(tiny_sd1, tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    save_lora(random_lora(tiny_sd1, 4, 2, seed=1, scale=0.3), d / "a.safetensors", version="sd1")
    save_lora(random_lora(tiny_sd1, 4, 2, seed=2, scale=0.3), d / "b.safetensors", version="sd1")
    save_lora(random_lora(tiny_sd1, 4, 2, seed=1, scale=0.3), d / "a_peft", "peft")
    save_lora(random_lora(tiny_sd1, 4, 2, seed=1, scale=0.3), d / "a_diff.safetensors", "diffusers")
    single, config = save_tiny_single_file(d / "model.safetensors", "sd1")
    return dict(dir=d, a=d / "a.safetensors", b=d / "b.safetensors", peft=d / "a_peft", diff=d / "a_diff.safetensors",
                single=single, config=config, folder=save_tiny_diffusers(d / "model_dir", "sd1"))


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --- LoRA files whose tensors or configs are not a LoRA's ----------------------------------------


def _kohya_variant(files, tmp_path, edit):
    state, meta = _tensors(files["a"])
    out = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in edit(state).items()}, str(out), metadata=meta)
    return out


def _first(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def _peft_variant(files, tmp_path, edit_config=None, drop_config=False):
    out = tmp_path / "broken_peft"
    shutil.copytree(files["peft"], out)
    config = out / "unet" / "adapter_config.json"
    if drop_config:
        config.unlink()
    else:
        config.write_text(json.dumps(edit_config(json.loads(config.read_text()))))
    return out


def _diffusers_variant(files, tmp_path):
    state, meta = _tensors(files["diff"])
    module = _first(state, ".lora_A.weight").removesuffix(".lora_A.weight")
    out = tmp_path / "broken_diff.safetensors"
    safetensors.torch.save_file({**state, module + ".alpha": torch.tensor([1.0, 2.0])}, str(out), metadata=meta)
    return out


BROKEN = {
    "kohya alpha of two values": (lambda f, t: _kohya_variant(f, t, lambda s: {
        **s, _first(s, ".alpha"): torch.tensor([1.0, 2.0])}), "an alpha is one number"),
    "kohya rank 0": (lambda f, t: _kohya_variant(f, t, lambda s: {
        **s, _first(s, ".lora_down.weight"): s[_first(s, ".lora_down.weight")][:0],
        _first(s, ".lora_up.weight"): s[_first(s, ".lora_up.weight")][:, :0]}), "rank >= 1"),
    "kohya int8 weights": (lambda f, t: _kohya_variant(f, t, lambda s: {
        k: v.to(torch.int8) if k.endswith("weight") else v for k, v in s.items()}), "floating point"),
    "lora_te_ and lora_te1_ for one module": (lambda f, t: _kohya_variant(f, t, lambda s: {
        **s, **{k.replace("lora_te_", "lora_te1_"): v * 2 for k, v in s.items() if k.startswith("lora_te_")}}),
        "keep one of them"),
    "peft alpha a string": (lambda f, t: _peft_variant(f, t, lambda c: {**c, "lora_alpha": "abc"}),
                            "an alpha is one number"),
    "peft alpha null": (lambda f, t: _peft_variant(f, t, lambda c: {**c, "lora_alpha": None}), "an alpha is one number"),
    "peft alpha_pattern a list": (lambda f, t: _peft_variant(f, t, lambda c: {**c, "alpha_pattern": [1]}),
                                  "alpha_pattern is a list"),
    "peft config a list": (lambda f, t: _peft_variant(f, t, lambda c: [c]), "not an adapter config object"),
    "peft weights without config": (lambda f, t: _peft_variant(f, t, drop_config=True), "no readable adapter_config"),
    "diffusers .alpha of two values": (_diffusers_variant, "an alpha is one number"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_lora_file_that_is_no_lora_is_one_line(files, tmp_path, capsys, case):
    """Each was a traceback, or (te/te1, int8, a PEFT U-Net without config) a silently wrong LoRA, before."""
    make, says = BROKEN[case]
    broken = make(files, tmp_path)
    out = tmp_path / "out.safetensors"
    error = _one_error(convert_recipe, ["--to", "kohya", broken, out], capsys)
    assert str(broken) in error and says in error, error
    assert not out.exists()
    error = _one_error(merge_recipe, ["--models", files["a"], broken, "--save_to", out], capsys)
    assert says in error and not out.exists()


def test_special_files_are_named_as_what_they_are(files, tmp_path, capsys):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"x": torch.ones(1)}, pickled)
    for given, says in ((fifo, "is a FIFO"), (Path("/dev/zero"), "is a device"), (pickled, "rename it to .ckpt")):
        error = _one_error(merge_recipe, ["--models", files["a"], given, "--save_to", tmp_path / "m.safetensors"], capsys)
        assert says in error, error


# --- outputs -------------------------------------------------------------------------------------


def test_output_paths_that_do_not_say_what_is_written(files, tmp_path, capsys):
    """No output replaces a FIFO; a file output's suffix says its format (a diffusers file in a pickle lost its
    alphas); a PEFT folder is not named like a file; all refused before anything is read."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    (tmp_path / "folder.safetensors").mkdir()
    lora_merge = ["--models", files["a"], files["b"]]
    cases = [
        (merge_recipe, [*lora_merge, "--save_to", fifo], "is a FIFO"),
        (svd_recipe, [*lora_merge, "--save_to", tmp_path / "merged"], "must end in .safetensors"),
        (merge_recipe, [*lora_merge, "--save_to", tmp_path / "merged.txt"], "must end in .safetensors"),
        (merge_recipe, [*lora_merge, "--save_to", tmp_path / "folder.safetensors"], "is a folder"),
        (merge_recipe, ["--sd_model", files["single"], "--model_config", files["config"], "--models", files["a"],
                        "--save_to", tmp_path / "model.SAFETENSORS"], "must end in .safetensors"),
        (convert_recipe, ["--to", "diffusers", files["a"], tmp_path / "d.ckpt"], "must end in .safetensors"),
        (convert_recipe, ["--to", "peft", files["a"], tmp_path / "p.safetensors"], "a folder name without"),
    ]
    for recipe, argv, says in cases:
        before = sorted(tmp_path.iterdir())
        assert says in _one_error(recipe, argv, capsys)
        assert sorted(tmp_path.iterdir()) == before
    assert fifo.is_fifo()


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, says", [("meta", "not supported"), ("xla", "not supported"),
                                          ("cuda:7", "cuda:0 .. cuda:0"), ("mps", "no Apple MPS")])
def test_devices_torch_names_but_nothing_runs_on(monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=says):
        resolve_device(device)
    assert resolve_device("cuda:0").index == 0


def test_options_that_would_do_nothing_are_refused(files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    lora_merge = ["--models", files["a"], files["b"], "--save_to", out]
    into_single = ["--sd_model", files["single"], "--model_config", files["config"], "--models", files["a"], "--save_to", out]
    other_config = ["--model_config", files["config"]]
    cases = [
        (merge_recipe, [*lora_merge, "--v2"], "--v2: only used when merging into a model"),
        (merge_recipe, [*lora_merge, *other_config], "--model_config: only used when merging into a model"),
        (merge_recipe, [*into_single, "--concat", "false"], "--concat: only used when merging LoRAs"),
        (merge_recipe, ["--sd_model", files["folder"], *other_config, "--models", files["a"], "--save_to", out],
         "only used for single-file models"),
        (extract_recipe, ["--model_org", files["folder"], "--model_tuned", files["folder"], *other_config,
                          "--save_to", out], "only used for single-file models"),
        (generate_recipe, ["--ckpt", files["folder"], *other_config, "--prompt", "x", "--outdir", tmp_path / "g"],
         "only used for single-file models"),
    ]
    for recipe, argv, says in cases:
        assert says in _one_error(recipe, argv, capsys)
    assert not out.exists() and not (tmp_path / "g").exists()


# --- models --------------------------------------------------------------------------------------


def test_merged_weights_that_overflow_are_refused(files, tmp_path, capsys):
    """fp16 holds up to 65504: a large ratio merged in (or saved as) fp16 wrote inf weights with exit 0."""
    into = ["--sd_model", files["single"], "--model_config", files["config"], "--models", files["a"], "--ratios", "1e7"]
    for precision in (["--save_precision", "fp16"], ["--precision", "fp16"]):
        out = tmp_path / "m.safetensors"
        error = _one_error(merge_recipe, [*into, *precision, "--save_to", out], capsys)
        assert str(files["a"]) in error and "not finite in torch.float" in error and not out.exists()


@pytest.mark.parametrize("case, message", [("missing", "needs tokenizer/ (not found)"),
                                           ("empty", "tokenizer/ is missing or broken")])
def test_a_model_folder_without_its_tokenizer_is_refused(files, tmp_path, capsys, case, message):
    """transformers loads a missing or empty tokenizer/ as a 2-token tokenizer: every prompt would become unknown
    tokens."""
    folder = tmp_path / "model"
    shutil.copytree(files["folder"], folder)
    shutil.rmtree(folder / "tokenizer")
    if case == "empty":
        (folder / "tokenizer").mkdir()
    out = tmp_path / "merged.safetensors"
    error = _one_error(merge_recipe, ["--sd_model", folder, "--models", files["a"], "--save_to", out], capsys)
    assert message in error and not out.exists()


def test_a_lora_that_changes_nothing_is_reported(files, tmp_path, caplog):
    from lora_sd.ops.merge import load_loras

    state, meta = _tensors(files["a"])
    zero = tmp_path / "alpha0.safetensors"
    safetensors.torch.save_file({k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in state.items()},
                                str(zero), metadata=meta)
    with caplog.at_level("WARNING"):
        load_loras([files["a"], zero])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(zero) in warned[0] and "alpha 0" in warned[0], warned


# --- generate ------------------------------------------------------------------------------------


def test_prompt_files(tmp_path):
    from lora_sd.generate import read_prompt_file

    good = tmp_path / "prompts.txt"
    good.write_text("# a comment, as sd-scripts skips it\n\na photo of a cat\n  a dog  \n", encoding="utf-8")
    assert read_prompt_file(good) == ["a photo of a cat", "a dog"]
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path, says in ((latin, "not a UTF-8 text file"), (tmp_path, "is a folder"), (fifo, "is a FIFO"),
                       (tmp_path / "none.txt", "no such file")):
        with pytest.raises(ConfigError, match=says):
            read_prompt_file(path)


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_out_of_range_are_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch, seed):
    monkeypatch.setattr("lora_sd.models.load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--ckpt", files["folder"], "--prompt", "x", "--seed", seed, "--outdir", tmp_path / "g"]
    assert "--seed: must be in [0, 4294967295]" in _one_error(generate_recipe, argv, capsys)


# --- resize --------------------------------------------------------------------------------------


def test_resize_source_without_images_and_destination_a_file(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("no images here")
    error = _one_error(resize_recipe, [src, tmp_path / "dst"], capsys)
    assert "holds no images" in error and not (tmp_path / "dst").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _one_error(resize_recipe, [src, tmp_path / "file"], capsys)

