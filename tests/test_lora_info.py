"""recipes/lora_info.py: every format and kind we read, numbers checked against the LoRA written.

The delta norms are checked against `kind_formulas` (the published formulas, not our adapter_math).
"""

import json
from collections import Counter

import pytest
import safetensors.torch
import torch

from lora_sd.cli import run_main
from lora_sd.formats import save_lora
from lora_sd.formats.kohya import kohya_file_contents
from recipes import lora_info
from tests import kind_formulas
from tests.helpers import one_error_line, random_lora, random_lycoris

TRAINING_META = {
    "ss_training_comment": "cats",
    "ss_training_started_at": "1700000000.5",
    "ss_tag_frequency": json.dumps({"2_sks cat": {"sks cat": 4, "a photo": 1, "sitting": 2}}),
    "ss_dataset_dirs": json.dumps({"2_sks cat": {"n_repeats": 2, "img_count": 4}}),
    "ss_bucket_info": json.dumps({"buckets": {"0": {"resolution": [64, 64], "count": 8}}, "mean_img_ar_error": 0.0}),
}


def written(tiny, case):
    """(the LoRA, how to save it) for each case."""
    if case in ("kohya", "diffusers", "peft"):
        lora = random_lora(tiny, network_dim=4, network_alpha=2, conv_dim=3 if case == "kohya" else None,
                           conv_alpha=1, scale=0.3)
        lora.metadata.update(TRAINING_META)
        return lora, case
    if case == "loha":
        return random_lycoris(tiny, "loha", rank=2, alpha=1.5), "kohya"
    if case == "lokr":
        return random_lycoris(tiny, "lokr", rank=2, lokr="w2"), "kohya"
    return random_lycoris(tiny, "lora", rank=2, dora="output"), "kohya"  # DoRA


def run(argv, capsys) -> str:
    assert run_main(lora_info.main, [str(a) for a in argv]) == 0
    return capsys.readouterr().out


def norm(m) -> float:
    return float(kind_formulas.delta(m, m.weight_shape()).double().norm())


CASES = {"kohya": ("kohya", {"LoRA"}), "diffusers": ("diffusers", {"LoRA"}), "peft": ("peft", {"LoRA"}),
         "loha": ("kohya", {"LoHa"}), "lokr": ("kohya", {"LoKr"}), "dora": ("kohya", {"LoRA (DoRA)"})}


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_kind(tiny_sd1, case, tmp_path, capsys):
    lora, fmt = written(tiny_sd1, case)
    path = save_lora(lora, tmp_path / ("lora" if fmt == "peft" else "lora.safetensors"), fmt=fmt)
    info = json.loads(run([path, "--json", "--top", "5"], capsys))
    want_fmt, kinds = CASES[case]
    mods = lora.modules
    assert info["format"] == want_fmt and set(info["kinds"]) == kinds and info["modules"] == len(mods)
    assert info["base_model"] in ("SD 1.x", "SD 1.x/2.x")
    assert info["components"] == {c: len(lora.component(c)) for c in ("unet", "text_encoder")}
    linear = [m for m in mods.values() if not m.is_3x3]
    assert info["ranks"] == {str(r): n for r, n in Counter(m.rank for m in linear).items()}
    assert info["alphas"] == {f"{a:g}": n for a, n in Counter(m.alpha for m in linear).items()}
    assert sum(info["conv_ranks"].values()) == sum(m.is_3x3 for m in mods.values())
    want = sorted(((norm(m), k) for k, m in mods.items()), reverse=True)[:5]
    got = info["delta_norms"]["largest"]
    assert [d["module"] for d in got] == [k for _, k in want]
    assert [d["norm"] for d in got] == pytest.approx([n for n, _ in want], rel=1e-5)
    assert info["non_finite"] == {"modules": 0, "values": 0, "per_module": {}}
    assert (info["delta_norms"]["dora_note"] is not None) == (case == "dora")

    text = run([path, "--top", "3"], capsys)
    assert f"format:      {want_fmt}" in text and f"modules:     {len(mods)}" in text
    assert f"{want[0][0]:12.4g}  {want[0][1]}" in text and want[3][1] not in text  # top 3 only
    assert "non-finite:  none" in text


def test_training_metadata_readable(tiny_sd1, tmp_path, capsys):
    lora, _ = written(tiny_sd1, "kohya")
    path = save_lora(lora, tmp_path / "lora.safetensors")
    meta = json.loads(run([path, "--json"], capsys))["metadata"]
    assert meta["training"]["ss_training_started_at"] == "2023-11-14T22:13:20+00:00"
    assert meta["training"]["ss_training_comment"] == "cats"
    assert meta["datasets"]["ss_tag_frequency"] == {
        "2_sks cat": {"distinct_tags": 3, "most_frequent": [["sks cat", 4], ["sitting", 2], ["a photo", 1]]}}
    assert meta["datasets"]["ss_dataset_dirs"] == {"2_sks cat": {"n_repeats": 2, "img_count": 4}}
    assert meta["datasets"]["ss_bucket_info"]["images_per_resolution"] == {"64x64": 8}
    assert meta["network"]["ss_network_args"] == {"conv_dim": "3", "conv_alpha": "1"}
    assert len(meta["hashes"]["sshs_model_hash"]) == 64 and meta["modelspec"]["sai_model_spec"] == "1.0.0"
    text = run([path], capsys)
    assert "ss_training_started_at: 2023-11-14T22:13:20+00:00" in text
    assert '"most_frequent": [["sks cat", 4], ["sitting", 2], ["a photo", 1]]' in text


def test_non_finite_values_reported_not_refused(tiny_sd1, tmp_path, capsys):
    lora = random_lora(tiny_sd1, scale=0.3)
    keys = list(lora.modules)
    lora.modules[keys[0]].up[0, :3] = float("nan")
    lora.modules[keys[5]].down[1, 0] = float("inf")
    state, metadata = kohya_file_contents(lora)  # save_lora refuses to write NaN: a file from elsewhere
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, str(path), metadata)
    info = json.loads(run([path, "--json", "--top", "1000"], capsys))
    assert info["non_finite"] == {"modules": 2, "values": 4, "per_module": {keys[0]: 3, keys[5]: 1}}
    listed = {d["module"] for d in info["delta_norms"]["largest"]}
    assert len(listed) == len(keys) - 2 and keys[0] not in listed
    text = run([path], capsys)
    assert "NON-FINITE:  4 NaN/inf values in 2 module(s)" in text and f"    {keys[0]}: 3" in text


def test_bad_input_one_line(tmp_path, capsys):
    assert "no such file or folder" in one_error_line(lora_info, [tmp_path / "missing.safetensors"], capsys)
    other = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    assert "keys of no known LoRA format" in one_error_line(lora_info, [other], capsys)
    assert "--top -1" in one_error_line(lora_info, [other, "--top", "-1"], capsys)


def test_sdxl_lora(tmp_path, capsys):
    from lora_sd.tiny import build_tiny_sd
    from tests.test_sdxl_ops import sdxl_lora

    lora = sdxl_lora(build_tiny_sd("sdxl"), 4, 2, 2, 1, seed=1)
    path = save_lora(lora, tmp_path / "xl.safetensors", version="sdxl")
    info = json.loads(run([path, "--json"], capsys))
    assert info["base_model"] == "SDXL" and info["components"] == {
        c: len(lora.component(c)) for c in ("unet", "text_encoder", "text_encoder_2")}
