"""LyCORIS-kind files that are broken: one FormatError line naming the file and the module, nothing written."""

import pytest
import torch

from lora_sd.errors import FormatError
from lora_sd.formats import read_lora
from lora_sd.formats.names import kohya_name
from recipes import convert_lora as convert_recipe
from tests.helpers import one_error_line
from tests.test_formats_lycoris import CASES, CONV, FF, K, TE, write


def case(name, key):
    return {k: v.clone() for k, v in CASES[name][key].items()}


def loha():
    return case("loha linear", FF)


def lokr():
    return case("lokr decomposed both", K)


def dora():
    return case("dora output axis", TE)


def edit(parts, **changes):
    for k, v in changes.items():
        if v is None:
            parts.pop(k)
        else:
            parts[k] = v
    return parts


NAN = torch.tensor([[float("nan")]])
BROKEN = {  # name: (key, tensors, what the message says)
    "mixed kinds": (FF, {**loha(), "lora_down.weight": torch.ones(2, 8)}, "mixes tensors of several kinds"),
    "hada_w1_a without hada_w1_b": (FF, edit(loha(), hada_w1_b=None), "has no hada_w1_b"),
    "one Tucker core of two": (CONV, edit(case("loha tucker conv", CONV), hada_t2=None), "only one of hada_t1/hada_t2"),
    "lokr_w1 and lokr_w1_a": (K, {**lokr(), "lokr_w1": torch.ones(4, 4)}, "has both lokr_w1 and lokr_w1_a"),
    "lokr_w1_a without lokr_w1_b": (K, edit(lokr(), lokr_w1_b=None), "has lokr_w1_a without lokr_w1_b"),
    "Tucker core without factors": (CONV, {"lokr_w1": torch.ones(2, 2), "lokr_t2": torch.ones(2, 2, 3, 3),
                                           "lokr_w2": torch.ones(4, 4)}, "lokr_t2 without its factors"),
    "loha factor ranks disagree": (FF, edit(loha(), hada_w1_b=torch.ones(3, 8)), "factor ranks disagree"),
    "loha w1 and w2 ranks disagree": (FF, edit(loha(), hada_w2_a=torch.ones(64, 3), hada_w2_b=torch.ones(3, 8)),
                                      "factor ranks disagree"),
    "lokr ranks of w1 and w2 disagree": (K, edit(lokr(), lokr_w2_a=torch.ones(4, 2), lokr_w2_b=torch.ones(2, 8)),
                                         "factor ranks disagree"),
    "Tucker core of another rank": (CONV, edit(case("loha tucker conv", CONV), hada_t1=torch.ones(3, 3, 3, 3)),
                                    "factor ranks disagree"),
    "Hadamard factors of two shapes": (FF, edit(loha(), hada_w2_b=torch.ones(2, 9)), "differ in shape"),
    "kron product is no 3x3 conv": (CONV, edit(case("lokr conv flattened", CONV), lokr_w2_b=torch.ones(2, 35)),
                                    "no 3x3 conv weight"),
    "3-D factor": (FF, edit(loha(), hada_w1_a=torch.ones(64, 2, 1)), "hada_w1_a is 3-D"),
    "dora_scale fits neither axis": (TE, edit(dora(), dora_scale=torch.ones(31, 1)), "fits neither axis"),
    "dora_scale with a kernel": (CONV, edit(case("dora output axis", CONV), dora_scale=torch.ones(1, 8, 3, 3)),
                                 "one magnitude per row or column"),
    "int8 factor": (FF, edit(loha(), hada_w1_a=torch.ones(64, 2, dtype=torch.int8)), "floating point"),
    "int dora_scale": (TE, edit(dora(), dora_scale=torch.ones(32, 1, dtype=torch.int32)), "floating point"),
    "empty factor": (K, edit(lokr(), lokr_w1_a=torch.ones(4, 0), lokr_w1_b=torch.ones(0, 4)), "empty"),
    "NaN in a LoKr factor": (K, edit(lokr(), lokr_w2_b=NAN.expand(1, 8).clone()), "non-finite"),
    "NaN in dora_scale": (TE, edit(dora(), dora_scale=NAN.expand(32, 1).clone()), "non-finite"),
    "inf in a Tucker core": (CONV, edit(case("loha tucker conv", CONV), hada_t2=torch.full((2, 2, 3, 3), float("inf"))),
                             "non-finite"),
    "alpha of several values": (FF, edit(loha(), alpha=torch.ones(2)), "an alpha is one number"),
    "another LyCORIS algorithm": (FF, {"oft_blocks": torch.ones(4, 2, 2), "alpha": torch.tensor(1.0)},
                                  "not a tensor of a kind lora-sd reads"),
    "lora_mid without its down": (CONV, {"lora_mid.weight": torch.ones(2, 2, 3, 3), "lora_up.weight": torch.ones(8, 2, 1, 1)},
                                  "lora_mid.weight"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_module_is_one_line_naming_file_and_module(tmp_path, broken):
    key, tensors, says = BROKEN[broken]
    fine = {"unet.mid_block.resnets.0.time_emb_proj": CASES["lokr both full"][K]}  # a sound module beside it
    path = write(tmp_path / "broken.safetensors", {key: tensors, **fine})
    with pytest.raises(FormatError) as e:
        read_lora(path)
    msg = str(e.value)
    assert says in msg and str(path) in msg and "\n" not in msg
    assert kohya_name(key) in msg or key in msg, msg


def test_convert_recipe_refuses_in_one_line_and_writes_nothing(tmp_path, capsys):
    key, tensors, _ = BROKEN["lokr_w1 and lokr_w1_a"]
    src = write(tmp_path / "broken.safetensors", {key: tensors})
    line = one_error_line(convert_recipe, ["--to", "kohya", src, tmp_path / "out.safetensors"], capsys)
    assert "lokr_w1" in line and kohya_name(key) in line
    assert not (tmp_path / "out.safetensors").exists()
