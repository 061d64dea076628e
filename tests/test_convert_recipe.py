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
from recipes.convert_lora import main, parse_args
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
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    unknown = tmp_path / "unknown.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, unknown)
    code = tmp_path / "code.ckpt"
    with open(code, "wb") as f:
        torch.save({"w": torch.zeros(2), "x": Evil()}, f)
    junk_ckpt = tmp_path / "junk.ckpt"
    junk_ckpt.write_bytes(pickle.dumps([1, 2, 3])[:5])
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.ckpt")
    truncated_zip = tmp_path / "truncated.ckpt"
    truncated_zip.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:-100])  # torch: OSError EINVAL
    half_zip = tmp_path / "half.ckpt"
    half_zip.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:1000])  # torch: RuntimeError, no central directory
    old_pickle = tmp_path / "old.ckpt"
    torch.save({"w": torch.zeros(100)}, old_pickle, _use_new_zipfile_serialization=False)
    truncated_old = tmp_path / "truncated_old.ckpt"
    truncated_old.write_bytes(old_pickle.read_bytes()[:-100])
    return {
        "not a tensor file": (text, "not a valid safetensors file: its first 8 bytes are no safetensors header length"),
        "truncated": (truncated, "not a valid safetensors file: truncated: its header lists more tensor data"),
        "bad header json": (bad_json, "not a valid safetensors file: its header is not valid JSON"),
        "empty": (empty, "is empty (0 bytes)"),
        "unknown keys": (unknown, "keys of no known LoRA format (first key: 'model.diffusion_model"),
        "pickle needing code": (code, "needs arbitrary code to load"),
        "broken pickle": (junk_ckpt, "not a torch checkpoint, or a corrupt one: unpickling failed"),
        "truncated zip ckpt": (truncated_zip, "a truncated or corrupt torch zip archive"),
        "half a zip ckpt": (half_zip, "a truncated or corrupt torch zip archive"),
        "truncated old-style ckpt": (truncated_old, "a truncated torch checkpoint (its data ends early)"),
        "missing": (tmp_path / "nope.safetensors", "no such file"),
    }


BAD_INPUTS = ["not a tensor file", "truncated", "bad header json", "empty", "unknown keys", "pickle needing code",
              "broken pickle", "truncated zip ckpt", "half a zip ckpt", "truncated old-style ckpt", "missing"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_and_nothing_written(kohya_file, tmp_path, capsys, case):
    """Each broken file is named with what is wrong with it (no catch-all "truncated or corrupt")."""
    path, message = _bad_inputs(tmp_path, kohya_file)[case]
    out = tmp_path / "out" / "x.safetensors"
    assert run_main(main, ["--to", "diffusers", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_a_bug_is_not_renamed_a_corrupt_file(kohya_file, tmp_path, monkeypatch):
    """Only the errors a bad file raises become "corrupt file" messages: a bug in reading stays a bug."""
    import lora_sd.io

    ckpt = tmp_path / "plain.ckpt"
    torch.save({"w": torch.zeros(2)}, ckpt)

    def buggy(*args, **kwargs):
        raise AttributeError("a bug")

    monkeypatch.setattr("safetensors.safe_open", buggy)
    with pytest.raises(AttributeError, match="a bug"):
        load_lora(kohya_file[0])
    monkeypatch.setattr("torch.load", buggy)
    with pytest.raises(AttributeError, match="a bug"):
        lora_sd.io.read_tensor_file(ckpt)


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


def _tree_bytes(path):
    """{relative path: bytes} of a file or of every file under a folder."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("case", ["same file", "same peft folder", "file inside peft folder",
                                  "diffusers folder file", "same diffusers folder"])
def test_output_over_the_input_is_refused_before_any_work(kohya_file, tmp_path, capsys, monkeypatch, case):
    src, lora = kohya_file
    k = tmp_path / "k.safetensors"
    k.write_bytes(src.read_bytes())
    peft = save_lora(lora, tmp_path / "p", "peft")
    dfolder = tmp_path / "d"
    dfolder.mkdir()
    save_lora(lora, dfolder / "pytorch_lora_weights.safetensors", "diffusers")
    to, inp, out, how = {
        "same file": ("kohya", k, k, "is"),
        "same peft folder": ("peft", peft, peft, "is"),
        "file inside peft folder": ("kohya", peft, peft / "unet" / "adapter_model.safetensors", "is inside"),
        "diffusers folder file": ("diffusers", dfolder, dfolder / "pytorch_lora_weights.safetensors", "is inside"),
        "same diffusers folder": ("peft", dfolder, dfolder, "is"),
    }[case]
    before = _tree_bytes(inp)
    monkeypatch.setattr("lora_sd.formats.convert.read_lora", lambda *a: pytest.fail("read before the output was checked"))
    assert run_main(main, ["--to", to, str(inp), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: output {out}: {how} the input {inp}; writing it would overwrite or change that input "
                   "(give another output path)"), err
    assert _tree_bytes(inp) == before


def test_diffusers_output_warns_that_other_tools_do_not_load_it(kohya_file, tmp_path, caplog, capsys):
    src, _ = kohya_file
    assert run_main(main, ["--to", "diffusers", str(src), str(tmp_path / "d.safetensors")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("ComfyUI, AUTOMATIC1111 and sd-scripts do not load it" in m and "--to kohya" in m for m in warned), warned
    caplog.clear()
    assert run_main(main, ["--to", "kohya", str(src), str(tmp_path / "k.safetensors")]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "not in ComfyUI, AUTOMATIC1111 or sd-scripts" in " ".join(capsys.readouterr().out.split())


def test_output_under_a_file_is_refused_before_reading(kohya_file, tmp_path, capsys, monkeypatch):
    """The output's folder is checked like the other recipes' --save_to: one line, nothing read or written."""
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    monkeypatch.setattr("lora_sd.formats.convert.read_lora", lambda *a: pytest.fail("read before the output was checked"))
    assert run_main(main, ["--to", "peft", str(kohya_file), str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{blocker} is a file, not a folder" in err
    assert blocker.read_text() == "mine"
