"""Block-wise network_args (sd-scripts' networks.lora): block indexing of SD 1.x/2.x and SDXL U-Nets, lr weights
in the optimizer groups and in one AdamW step, zero-weight blocks without modules, block_dims / block_alphas /
conv_block_dims / conv_block_alphas in the saved file, and refusals.
"""

import pytest
import torch

from lora_sd.blocks import block_index
from lora_sd.cli import run_main
from lora_sd.training import optim
from tests.test_sdxl_train import xl_assets  # noqa: F401 (the session fixture)
from tests.test_train import args, assets, train_recipe  # noqa: F401 (the session fixture)

LR = 1e-3
DOWN = [0.0, 0.0, 1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # block 1 (down_blocks.0) learns nothing
UP = [1.0, 1.0, 1.0, 0.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # block 16 off, block 17 at 0.25


def test_sd_and_sdxl_block_numbers_are_sd_scripts():
    from lora_sd.tiny import build_tiny_sd

    sd1 = build_tiny_sd("sd1").unet
    # SD: 1 + 3 level + j down, 12 mid, 13 + 3 level + j up; samplers at j = 2 (full-size SD 1.5 names too)
    assert [block_index(n, sd1) for n in (
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.downsamplers.0.conv", "down_blocks.3.resnets.1.conv1",
        "mid_block.resnets.1.conv2", "up_blocks.0.resnets.2.conv1", "up_blocks.0.upsamplers.0.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q")] == [1, 3, 11, 12, 15, 15, 24]
    xl = build_tiny_sd("sdxl").unet
    # SDXL: the original layout's input_blocks.N -> 1 + N, middle_block.N -> 10 + N, output_blocks.N -> 13 + N
    assert [block_index(n, xl) for n in (
        "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "down_blocks.1.attentions.1.proj_in",
        "mid_block.resnets.0.conv1", "mid_block.attentions.0.proj_out", "mid_block.resnets.1.conv1",
        "up_blocks.0.attentions.0.proj_in", "up_blocks.0.upsamplers.0.conv", "up_blocks.1.resnets.2.conv2")] == \
        [2, 4, 6, 10, 11, 12, 13, 15, 18]


def _file(path):
    from lora_sd.formats import load_lora

    return load_lora(path)


def _unet_modules(lora):
    """{diffusers U-Net module path: LoraModule} of a LoRA's U-Net part."""
    return {k[len("unet."):]: m for k, m in lora.modules.items() if k.startswith("unet.")}


def test_lr_weights_reach_the_groups_and_zero_blocks_get_no_modules(assets, tmp_path, monkeypatch):  # noqa: F811
    from lora_sd.tiny import build_tiny_sd

    seen = []
    real = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda name, groups, *a: seen.append(groups) or
                        real(name, groups, *a))
    weights = DOWN + [3.0] + UP  # blocks 0-24
    result = train_recipe.main(args(assets, tmp_path / "out", "--network_args", "conv_dim=2",
                                    "down_lr_weight=" + ",".join(map(str, DOWN)), "mid_lr_weight=3",
                                    "up_lr_weight=" + ",".join(map(str, UP)), "--network_train_unet_only",
                                    "--optimizer_args", "weight_decay=0", steps=1))
    unet = result.unet
    names = {id(p): n for n, p in unet.named_parameters()}
    lr_of = {}
    for group in seen[0]:
        for p in group["params"]:
            module = names[id(p)].split(".lora_")[0]
            lr_of.setdefault(module, set()).add(group["lr"])
    assert lr_of and all(lrs == {LR * weights[block_index(m, unet)]} for m, lrs in lr_of.items())
    assert {block_index(m, unet) for m in lr_of} == {3, 4, 12, 13, 14, 15, 17}  # 1 and 16 (weight 0) are gone
    # the file: no module in blocks 1 and 16; one AdamW step moved each block's up weights by its lr
    mods = _unet_modules(_file(tmp_path / "out" / "lora.safetensors"))
    tiny = build_tiny_sd("sd1").unet
    assert {block_index(m, tiny) for m in mods} == {3, 4, 12, 13, 14, 15, 17}
    for block in (4, 12, 17):
        up = max(float(m.up.abs().max()) for k, m in mods.items() if block_index(k, tiny) == block)
        assert up == pytest.approx(LR * weights[block], rel=1e-3)


def test_block_dims_and_alphas_are_the_ranks_and_alphas_in_the_file(assets, tmp_path):  # noqa: F811
    from lora_sd.tiny import build_tiny_sd

    dims = [0] * 25
    alphas = [0.0] * 25
    conv_dims = [0] * 25
    for block, (dim, alpha, conv) in {1: (2, 1.0, 3), 3: (5, 2.0, 1), 12: (3, 0.0, 2), 13: (6, 1.5, 0),
                                      16: (1, 0.5, 0), 17: (4, 8.0, 2)}.items():
        dims[block], alphas[block], conv_dims[block] = dim, alpha, conv
    conv_alphas = [0.5] * 25
    train_recipe.main(args(assets, tmp_path / "out", "--network_args", "block_dims=" + ",".join(map(str, dims)),
                           "block_alphas=" + ",".join(map(str, alphas)),
                           "conv_block_dims=" + ",".join(map(str, conv_dims)),
                           "conv_block_alphas=" + ",".join(map(str, conv_alphas)), "--network_train_unet_only"))
    tiny = build_tiny_sd("sd1").unet
    mods = _unet_modules(_file(tmp_path / "out" / "lora.safetensors"))
    expected = {}
    from lora_sd.targets import target_modules

    for name, is_3x3 in target_modules("unet", tiny, with_conv=True).items():
        b = block_index(name, tiny)
        rank = conv_dims[b] if is_3x3 else dims[b]
        if rank:
            expected[name] = (rank, (conv_alphas[b] if is_3x3 else alphas[b]) or float(rank))
    assert {k: (m.rank, m.alpha) for k, m in mods.items()} == expected
    assert any(r == 6 for r, _ in expected.values()) and any(a == 8.0 for _, a in expected.values())


def test_block_lengths_are_checked_against_the_model_family(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code = run_main(train_recipe.main, args(assets, out, "--network_args", "block_dims=" + ",".join(["4"] * 23)))
    err = capsys.readouterr().err
    assert code == 2 and len([e for e in err.splitlines() if "error" in e]) == 1
    assert not (out / "lora.safetensors").exists()
    assert "`network_args` block_dims has 23 values, but a SD 1.x/2.x U-Net has 25 blocks: give 25" in err, err


REFUSALS = {
    "length": (["block_dims=4,4,4"], "block_dims must have 25 values (SD 1.x/2.x) or 23 (SDXL), one per block; got 3"),
    "down_length": (["down_lr_weight=1,1,1"], "down_lr_weight must have 12 values (SD 1.x/2.x) or 9 (SDXL)"),
    "mid_length": (["mid_lr_weight=1,1"], "mid_lr_weight must have 1 values (SD 1.x/2.x) or 3 (SDXL)"),
    "not_a_number": (["up_lr_weight=" + ",".join(["1"] * 11 + ["x"])], "up_lr_weight must be a number, got 'x'"),
    "negative": (["mid_lr_weight=-1"], "mid_lr_weight must be >= 0, got '-1'"),
    "not_an_int": (["block_dims=" + ",".join(["4"] * 24 + ["2.5"])], "block_dims must be an integer, got '2.5'"),
    "shape": (["down_lr_weight=wave"], "down_lr_weight must be comma-separated numbers or one of cosine, sine"),
    "with_network_weights": (["block_dims=" + ",".join(["4"] * 25), "--network_weights", "x.safetensors"],
                             "block_dims / conv_block_dims with `network_weights`"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_block_refusals_are_one_line(assets, tmp_path, case, capsys):  # noqa: F811
    extra, message = REFUSALS[case]
    out = tmp_path / "out"
    assert run_main(train_recipe.main, args(assets, out, "--network_args", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_lr_weight_shapes_are_sd_scripts():
    import math

    from lora_sd.blocks import Blocks

    b = Blocks({"down_lr_weight": "cosine+0.5", "up_lr_weight": "linear", "block_lr_zero_threshold": 0.1}, False,
               4, 1.0, None, 1.0)
    assert b.lr_weight[:12] == pytest.approx([math.sin(math.pi * i / 11 / 2) + 0.5 for i in reversed(range(12))])
    assert b.lr_weight[12] == 1.0
    assert b.lr_weight[13:] == pytest.approx([0.0, 0.0] + [i / 11 for i in range(2, 12)])  # <= 0.1: off
    assert b.dims[14] == 0 and b.dims[15] == 4
    xl = Blocks({"up_lr_weight": "zeros+1"}, True, 4, 1.0, None, 1.0)
    assert len(xl.lr_weight) == 23 and xl.lr_weight == [1.0] * 23


def test_sdxl_blocks_give_the_ranks_and_learning_rates(xl_assets, tmp_path, monkeypatch):  # noqa: F811
    from lora_sd.targets import target_modules
    from lora_sd.tiny import build_tiny_sd

    seen = []
    real = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda name, groups, *a: seen.append(groups) or
                        real(name, groups, *a))
    dims = [(b % 4) + 1 for b in range(23)]
    dims[6] = 0  # input_blocks.5 (down_blocks.1.attentions.1): no modules
    mid = [0.5, 2.0, 1.0]
    result = train_recipe.main(args(xl_assets, tmp_path / "out", "--network_args",
                                    "block_dims=" + ",".join(map(str, dims)), "mid_lr_weight=" + ",".join(map(str, mid)),
                                    "--network_train_unet_only", steps=1))
    tiny = build_tiny_sd("sdxl").unet
    mods = _unet_modules(_file(tmp_path / "out" / "lora.safetensors"))
    expected = {n: dims[block_index(n, tiny)] for n in target_modules("unet", tiny) if dims[block_index(n, tiny)]}
    assert {k: m.rank for k, m in mods.items()} == expected
    assert {block_index(k, tiny) for k in mods} == {5, 11, 13, 14, 15}  # attentions only (no conv_dim); 6 is off
    names = {id(p): n for n, p in result.unet.named_parameters()}
    lrs = {block_index(names[id(p)].split(".lora_")[0], tiny): g["lr"] for g in seen[0] for p in g["params"]}
    assert (lrs[5], lrs[11], lrs[13]) == pytest.approx((LR, LR * 2.0, LR))  # middle_block.1 at mid weight 2
