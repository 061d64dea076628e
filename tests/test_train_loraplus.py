"""LoRA+ (loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio): the up matrices' learning
rate in the optimizer's groups and in what one AdamW step does; given as network_args or top-level options;
refusals.

AdamW's first step moves every weight with a gradient by exactly its learning rate (m / sqrt(v) = sign(g)),
and only the up matrices have a gradient at the first step (they start at zero): so after one step the
largest |up| of each part is that part's up learning rate.
"""

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.training import optim
from tests.test_train import args, assets, kohya_file, refused_run, train_recipe  # noqa: F401 (the session fixture)

LR = 1e-3


def _groups(monkeypatch):
    seen = []
    real = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda name, groups, *a: seen.append(groups) or
                        real(name, groups, *a))
    return seen


def _max_up(state, prefix):
    return max(float(v.abs().max()) for k, v in state.items() if k.startswith(prefix) and "lora_up" in k)


@pytest.mark.parametrize("how", ["network_args", "top_level"])
def test_loraplus_scales_the_up_matrices_learning_rate(assets, tmp_path, monkeypatch, how):  # noqa: F811
    seen = _groups(monkeypatch)
    if how == "network_args":
        extra = ["--network_args", "loraplus_lr_ratio=4", "loraplus_unet_lr_ratio=8"]
    else:
        extra = ["--loraplus_lr_ratio", "4", "--loraplus_unet_lr_ratio", "8"]
    result = train_recipe.main(args(assets, tmp_path / "out", *extra, "--optimizer_args", "weight_decay=0",
                                    steps=1))
    groups = seen[0]
    assert [g["lr"] for g in groups] == pytest.approx([LR, 4 * LR, LR, 8 * LR])  # te, te plus, unet, unet plus
    ups = {id(p) for m in (result.unet, result.text_encoder) for n, p in m.named_parameters() if ".lora_B." in n}
    assert all(id(p) in ups for g in (groups[1], groups[3]) for p in g["params"])
    assert not any(id(p) in ups for g in (groups[0], groups[2]) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for m in (result.unet, result.text_encoder)
                                                        for p in m.parameters())
    state, _ = kohya_file(tmp_path / "out" / "lora.safetensors")
    assert _max_up(state, "lora_unet_") == pytest.approx(8 * LR, rel=1e-3)
    assert _max_up(state, "lora_te_") == pytest.approx(4 * LR, rel=1e-3)


def test_without_loraplus_the_up_matrices_learn_at_the_learning_rate(assets, tmp_path, monkeypatch):  # noqa: F811
    seen = _groups(monkeypatch)
    train_recipe.main(args(assets, tmp_path / "out", "--optimizer_args", "weight_decay=0", steps=1))
    assert [g["lr"] for g in seen[0]] == [LR, LR]
    state, _ = kohya_file(tmp_path / "out" / "lora.safetensors")
    assert _max_up(state, "lora_unet_") == pytest.approx(LR, rel=1e-3)


def test_loraplus_on_dora_leaves_the_magnitude_with_the_down_matrices(assets, tmp_path, monkeypatch):  # noqa: F811
    seen = _groups(monkeypatch)
    result = train_recipe.main(args(assets, tmp_path / "out", "--network_module", "lycoris.kohya", "--network_args",
                                    "dora_wd=true", "loraplus_lr_ratio=2", "--network_train_unet_only", steps=1))
    names = {id(p): n for n, p in result.unet.named_parameters()}
    down, plus = seen[0]
    assert (down["lr"], plus["lr"]) == (LR, 2 * LR)
    assert {names[id(p)].split(".")[-3] for p in plus["params"]} == {"lora_B"}
    assert {names[id(p)].split(".")[-3] for p in down["params"]} == {"lora_A", "lora_magnitude_vector"}


REFUSALS = {
    "loha": (["--network_module", "lycoris.kohya", "--network_args", "algo=loha", "loraplus_lr_ratio=4"],
             "`loraplus_lr_ratio` (LoRA+) scales the learning rate of LoRA's up matrices; a LoHa has none"),
    "lokr_top_level": (["--network_module", "lycoris.kohya", "--network_args", "algo=lokr",
                        "--loraplus_unet_lr_ratio", "4"], "a LoKr has none"),
    "zero": (["--loraplus_lr_ratio", "0"], "`loraplus_lr_ratio` must be > 0"),
    "negative_arg": (["--network_args", "loraplus_text_encoder_lr_ratio=-2"],
                     "loraplus_text_encoder_lr_ratio must be >= 0, got '-2'"),
    "not_a_number": (["--network_args", "loraplus_lr_ratio=four"], "loraplus_lr_ratio must be a number"),
    "twice": (["--loraplus_lr_ratio", "4", "--network_args", "loraplus_lr_ratio=8"],
              "`loraplus_lr_ratio` is 4.0, but `network_args` says loraplus_lr_ratio=8.0: give it once"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_loraplus_refusals_are_one_line(assets, tmp_path, case, capsys):  # noqa: F811
    extra, message = REFUSALS[case]
    assert message in refused_run(assets, tmp_path / "out", extra, capsys)
