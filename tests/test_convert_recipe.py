"""recipes/convert_lora.py: conversions and one-line errors with nothing written."""

import copy
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from lora_sd.errors import ModelMismatchError
from lora_sd.formats import load_lora, save_lora
from recipes.convert_lora import main
from lora_sd.cli import run_main
from tests.helpers import random_lora


@pytest.fixture(scope="module")
def kohya_file(tiny_sd1, tmp_path_factory):
    lora = random_lora(tiny_sd1, network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5)
    return save_lora(lora, tmp_path_factory.mktemp("in") / "char.safetensors"), lora


@pytest.mark.parametrize("to,out", [("diffusers", "d.safetensors"), ("peft", "p"), ("kohya", "k.safetensors")])
def test_convert_each_way(kohya_file, tmp_path, to, out):
    src, lora = kohya_file
    assert run_main(main, ["--to", to, str(src), str(tmp_path / out)]) == 0
    back = load_lora(tmp_path / out)
    assert set(back.modules) == set(lora.modules)
    assert all(torch.equal(back.modules[k].up, m.up) and back.modules[k].alpha == m.alpha for k, m in lora.modules.items())


def test_fp16_output(kohya_file, tmp_path):
    src, _ = kohya_file
    assert run_main(main, ["--to", "diffusers", "--save_precision", "fp16", str(src), str(tmp_path / "d.safetensors")]) == 0
    assert {t.dtype for t in safetensors.torch.load_file(tmp_path / "d.safetensors").values()} == {torch.float16}


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def _bad_inputs(tmp_path, kohya_file):
    src, _ = kohya_file
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(src.read_bytes()[:-100])
    unknown = tmp_path / "unknown.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, unknown)
    code = tmp_path / "code.ckpt"
    with open(code, "wb") as f:
        torch.save({"w": torch.zeros(2), "x": Evil()}, f)
    junk_ckpt = tmp_path / "junk.ckpt"
    junk_ckpt.write_bytes(pickle.dumps([1, 2, 3])[:5])
    return {
        "not a tensor file": (text, "truncated or corrupt"),
        "truncated": (truncated, "truncated or corrupt"),
        "unknown keys": (unknown, "keys of no known LoRA format (first key: 'model.diffusion_model"),
        "pickle needing code": (code, "needs arbitrary code to load"),
        "broken pickle": (junk_ckpt, "truncated or corrupt"),
        "missing": (tmp_path / "nope.safetensors", "no such file"),
    }


@pytest.mark.parametrize("case", ["not a tensor file", "truncated", "unknown keys", "pickle needing code", "broken pickle", "missing"])
def test_bad_input_one_line_and_nothing_written(kohya_file, tmp_path, capsys, case):
    path, message = _bad_inputs(tmp_path, kohya_file)[case]
    out = tmp_path / "out" / "x.safetensors"
    assert run_main(main, ["--to", "diffusers", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_recipe_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("junk")
    r = subprocess.run([sys.executable, "recipes/convert_lora.py", "--to", "peft", str(bad), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"error: {bad}" in r.stderr
    assert not (tmp_path / "o").exists()


def test_lora_that_does_not_fit_the_model(kohya_file, tiny_sd1):
    _, lora = kohya_file
    wrong_name = copy.deepcopy(lora)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong_name.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q"] = wrong_name.modules.pop(key)
    unet = copy.deepcopy(tiny_sd1.unet)
    with pytest.raises(ModelMismatchError, match="attn9.to_q does not exist in the model"):
        wrong_name.apply_to(unet=unet, text_encoder=copy.deepcopy(tiny_sd1.text_encoder))
    assert not hasattr(unet, "peft_config")  # checked before anything was injected
    wrong_shape = copy.deepcopy(lora)
    m = wrong_shape.modules[key]
    m.down = torch.zeros(m.rank, m.down.shape[1] + 1)
    with pytest.raises(ModelMismatchError, match=r"attn1.to_q does not fit the model: down \(4, 9\)"):
        wrong_shape.apply_to(unet=copy.deepcopy(tiny_sd1.unet), text_encoder=copy.deepcopy(tiny_sd1.text_encoder))


def test_version_from_any_metadata_key(kohya_file, tmp_path):
    """A file that says SD 2 only in ss_base_model_version gets consistent SD 2 keys in its kohya output."""
    src, lora = kohya_file
    tagged = copy.deepcopy(lora)
    tagged.metadata = {"ss_base_model_version": "sd_v2"}
    d = save_lora(tagged, tmp_path / "d.safetensors", "diffusers")
    assert run_main(main, ["--to", "kohya", str(d), str(tmp_path / "k.safetensors")]) == 0
    meta = load_lora(tmp_path / "k.safetensors").metadata
    assert meta["ss_v2"] == "True" and meta["modelspec.architecture"].startswith("stable-diffusion-v2")


def test_lora_whose_text_encoder_does_not_fit_leaves_the_unet_alone(kohya_file, tiny_sd1):
    _, lora = kohya_file
    bad = copy.deepcopy(lora)
    key = next(k for k in bad.modules if k.startswith("text_encoder."))
    m = bad.modules[key]
    m.down = torch.zeros(m.rank, m.down.shape[1] + 1)
    unet = copy.deepcopy(tiny_sd1.unet)
    with pytest.raises(ModelMismatchError, match="does not fit the model"):
        bad.apply_to(unet=unet, text_encoder=copy.deepcopy(tiny_sd1.text_encoder))
    assert not hasattr(unet, "peft_config")
