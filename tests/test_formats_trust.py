"""What a LoRA file carries survives every conversion (kohya metadata included); broken tensors are refused."""

import copy
import json

import pytest
import safetensors
import safetensors.torch
import torch

from lora_sd.cli import run_main
from lora_sd.errors import FormatError
from lora_sd.formats import load_lora, read_lora, save_lora
from recipes.convert_lora import main
from tests.helpers import random_lora

KOHYA_METADATA = {
    "ss_training_comment": "my cat, trained with care — ünïcödé and \"quotes\"",
    "ss_output_name": "cat",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2",
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_learning_rate": "0.0001",
    "ss_tag_frequency": json.dumps({"img": {"cat": 12, "sitting": 3}}),
    "ss_dataset_dirs": json.dumps({"img": {"n_repeats": 10, "img_count": 12}}),
    "ss_training_started_at": "1700000000.5",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "cat",
    "modelspec.date": "2023-11-14T22:13:20",
}
NAMES = {"kohya": "lora.safetensors", "diffusers": "lora_diffusers.safetensors", "peft": "lora_peft"}


@pytest.fixture(scope="module")
def lora(tiny_sd1):
    lora = random_lora(tiny_sd1, network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5)
    lora.metadata = dict(KOHYA_METADATA)
    return lora


def file_metadata(path):
    """The metadata a LoRA file or folder carries: the safetensors header (each adapter file's for PEFT)."""
    files = sorted(path.glob("*/adapter_model.safetensors")) if path.is_dir() else [path]
    metas = []
    for f in files:
        with safetensors.safe_open(str(f), "pt") as handle:
            metas.append(handle.metadata())
    assert all(m == metas[0] for m in metas)
    return metas[0]


def tensors(path):
    files = sorted(path.glob("*/adapter_model.safetensors")) if path.is_dir() else [path]
    return {f"{f.parent.name}/{k}": t for f in files for k, t in safetensors.torch.load_file(f).items()}


@pytest.mark.parametrize("first,via", [("kohya", "peft"), ("kohya", "diffusers"), ("peft", "diffusers")])
def test_round_trip_keeps_metadata_and_tensors(lora, tmp_path, first, via):
    """first -> via -> first with the convert_lora recipe: the same tensors and the same kohya metadata."""
    start = save_lora(lora, tmp_path / NAMES[first], first)
    middle, end = tmp_path / ("mid_" + NAMES[via]), tmp_path / ("end_" + NAMES[first])
    assert run_main(main, ["--to", via, str(start), str(middle)]) == 0
    assert run_main(main, ["--to", first, str(middle), str(end)]) == 0
    assert all(file_metadata(middle)[k] == v for k, v in KOHYA_METADATA.items())
    assert file_metadata(end) == file_metadata(start)  # for kohya: the sshs_* hashes too
    a, b = tensors(start), tensors(end)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert load_lora(end).metadata == load_lora(start).metadata


def _broken(lora, key, part, values):
    bad = copy.deepcopy(lora)
    t = getattr(bad.modules[key], part).clone()
    t.view(-1)[: len(values)] = torch.tensor(values)
    setattr(bad.modules[key], part, t)
    return bad


KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def save_broken(monkeypatch):
    """save_lora without its own non-finite check: the files other tools (or a diverged run) leave behind."""
    import lora_sd.formats

    monkeypatch.setattr(lora_sd.formats, "_savable", lambda lora, path, precision: lora.to(torch.float32))
    return save_lora


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft", "kohya .ckpt"])
def test_non_finite_tensors_are_refused_naming_file_and_module(lora, tmp_path, fmt, save_broken):
    bad = _broken(lora, KEY, "up", [float("nan"), float("inf"), -float("inf")])
    path = tmp_path / ("lora.ckpt" if fmt == "kohya .ckpt" else NAMES[fmt])
    save_broken(bad, path, fmt.split()[0])
    with pytest.raises(FormatError, match=rf"^{path}: module {KEY} holds 3 non-finite values \(NaN/inf\); "):
        read_lora(path)


def test_non_finite_alpha_and_count_of_modules(lora, tmp_path, save_broken):
    bad = _broken(lora, KEY, "down", [float("nan")])
    other = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    bad = _broken(bad, other, "up", [float("inf")] * 2)
    path = save_broken(bad, tmp_path / "x.safetensors")
    with pytest.raises(FormatError, match=rf"^{path}: module (unet.*to_q holds 1|text_encoder.*fc1 holds 2) non-finite "
                                          r"values \(NaN/inf\) \(and 1 more module: 3 in all\); "):
        read_lora(path)
    alpha = copy.deepcopy(lora)
    alpha.modules[KEY].alpha = float("nan")
    path = save_broken(alpha, tmp_path / "alpha.safetensors")
    with pytest.raises(FormatError, match=f"module {KEY} holds 1 non-finite values"):
        read_lora(path)


def test_non_finite_input_stops_the_recipe_in_one_line(lora, tmp_path, capsys, save_broken):
    path = save_broken(_broken(lora, KEY, "down", [float("nan")]), tmp_path / "nan.safetensors")
    assert run_main(main, ["--to", "peft", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: module {KEY} holds 1 non-finite") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_save_that_would_write_non_finite_values_is_refused(tmp_path, lora):
    """fp16 tops out at 65504: a LoRA with larger values would be written as inf, which every reader then refuses."""
    lora = copy.deepcopy(lora)
    key = next(iter(lora.modules))
    lora.modules[key].up[0, 0] = 1e5
    with pytest.raises(FormatError, match=f"module {key} holds 1 non-finite values.*overflow save_precision fp16"):
        save_lora(lora, tmp_path / "a.safetensors", save_precision="fp16")
    save_lora(lora, tmp_path / "b.safetensors", save_precision="bf16")  # bf16 has float32's range
    lora.modules[key].up[0, 0] = float("nan")
    with pytest.raises(FormatError, match="nothing was written"):
        save_lora(lora, tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]
