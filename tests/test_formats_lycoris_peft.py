"""convert_lora between kohya files and PEFT adapter folders for every kind (the PEFT folder writer and reader
are the peft-bridge's: these pass once both branches are merged).

kohya -> peft -> kohya keeps what every module does (its merged weight) and the metadata.
"""

import pytest

from lora_sd.errors import FormatError
from lora_sd.formats import read_lora
from lora_sd.formats.convert import convert_lora_file
from tests.test_formats_lycoris import CASES, STRENGTH, a, expected, rnd, weight_of, write

KINDS = ["loha linear", "loha conv flattened", "loha tucker conv", "lokr w1 full, w2 decomposed", "lokr both full",
         "lokr decomposed both", "lokr conv flattened r1", "lokr tucker conv r1", "dora output axis"]  # one kind per file
# CASES' LoKr convs decompose the 8-channel conv's w2 [4, 4] at rank 2, which neither LyCORIS nor PEFT builds (both
# keep w2 full from r >= max(4, 4) / 2); at rank 1 PEFT's config reproduces them
CONV = next(iter(CASES["lokr conv flattened"]))
PEFT_CASES = {**CASES,
              "lokr conv flattened r1": {CONV: dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(4, 1), lokr_w2_b=rnd(1, 36), alpha=a(1))},
              "lokr tucker conv r1": {CONV: dict(lokr_w1=rnd(2, 2), lokr_t2=rnd(1, 1, 3, 3), lokr_w2_a=rnd(1, 4),
                                                 lokr_w2_b=rnd(1, 4), alpha=a(1))}}


@pytest.mark.parametrize("case", KINDS)
def test_kohya_to_peft_and_back_keeps_every_module(tiny_sd1, tmp_path, case):
    src = write(tmp_path / "in.safetensors", PEFT_CASES[case], metadata={"ss_seed": "7", "ss_network_module": "lycoris.kohya"})
    folder = convert_lora_file(src, tmp_path / "peft", "peft")
    assert read_lora(folder)[1] == "peft"
    back = convert_lora_file(folder, tmp_path / "back.safetensors", "kohya")
    for path in (folder, back):
        lora = read_lora(path)[0]
        assert lora.metadata["ss_seed"] == "7"
        for key, parts in PEFT_CASES[case].items():
            w = weight_of(tiny_sd1, key)
            assert (lora.modules[key].merged(w, STRENGTH) - expected(w, parts)).abs().max() <= 1e-5, (path, key)


@pytest.mark.parametrize("case", ["lokr conv flattened", "lokr tucker conv"])
def test_a_factor_split_peft_cannot_make_is_refused_naming_the_module(tmp_path, case):
    src = write(tmp_path / "in.safetensors", CASES[case])
    with pytest.raises(FormatError, match=f"module {CONV}: PEFT's LoKr would shape it"):
        convert_lora_file(src, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()


def test_input_axis_dora_to_peft_is_refused(tmp_path):
    src = write(tmp_path / "in.safetensors", CASES["dora input axis"])
    with pytest.raises(FormatError, match="merg"):
        convert_lora_file(src, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()
