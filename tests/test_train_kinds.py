"""lycoris.kohya networks (LoCon, LoHa, LoKr, DoRA) as PEFT adapters: config refusals, the adapters made on
networks.lora's targets, LyCORIS' scales and Tucker layout, and the strength (network_multiplier).

Training runs of every kind: tests/test_train_kinds_runs.py.
"""

import copy

import pytest
import torch

from lora_sd import adapter_math
from lora_sd.cli import run_main
from lora_sd.targets import NetworkSpec, lora_configs
from lora_sd.training.network import lora_strength
from tests.helpers import model_outputs
from tests.test_train import args, assets, refused_run, train_recipe  # noqa: F401 (the session fixture)

LYCORIS = ("--network_module", "lycoris.kohya", "--network_args")

REFUSALS = {
    "unknown_algo": ([*LYCORIS, "algo=lycoris"], "`network_args` algo must be one of lora, locon, loha, lokr"),
    "factor_loha": ([*LYCORIS, "algo=loha", "factor=4"], "factor does not apply to algo=loha"),
    "decompose_both_loha": ([*LYCORIS, "algo=loha", "decompose_both=true"], "decompose_both does not apply"),
    "tucker_lora": ([*LYCORIS, "algo=lora", "conv_dim=2", "use_tucker=true"],
                    "use_tucker does not apply to algo=lora"),
    "tucker_without_convs": ([*LYCORIS, "algo=loha", "use_tucker=true"], "use_tucker applies to 3x3 convs only"),
    "dora_lokr": ([*LYCORIS, "algo=lokr", "dora_wd=true"], "dora_wd does not apply to algo=lokr"),
    "factor_not_a_number": ([*LYCORIS, "algo=lokr", "factor=two"], "factor must be an integer, got 'two'"),
    "factor_zero": ([*LYCORIS, "algo=lokr", "factor=0"], "factor must be -1"),
    "not_a_bool": ([*LYCORIS, "algo=lokr", "decompose_both=maybe"], "decompose_both must be true or false"),
    "conv_alpha_nan": ([*LYCORIS, "algo=loha", "conv_dim=2", "conv_alpha=nan"], "conv_alpha must be a finite"),
    "algo_on_networks_lora": (["--network_args", "algo=loha"], 'set `network_module = "lycoris.kohya"`'),
    "other_preset": ([*LYCORIS, "algo=loha", "preset=attn-only"],
                     "preset 'attn-only' is not supported; supported: full"),
    "dropout": ([*LYCORIS, "algo=loha", "dropout=0.1"], "dropout is not supported"),
    "rank_dropout_one": ([*LYCORIS, "algo=locon", "rank_dropout=1"], "rank_dropout must be below 1"),
    "input_axis_dora": ([*LYCORIS, "dora_wd=true", "wd_on_output=false"], "wd_on_output=false"),
    "loha_as_diffusers": ([*LYCORIS, "algo=loha", "--save_model_as", "diffusers"], "a LoHa network cannot be saved"),
    "dora_strength": ([*LYCORIS, "dora_wd=true", "--network_multiplier", "0.5"], "`network_multiplier` 1 only"),
    "dora_fp8": ([*LYCORIS, "dora_wd=true", "--fp8_base", "--mixed_precision", "bf16"], "does not train on `fp8_base`"),
    "unknown_arg": ([*LYCORIS, "algo=loha", "rank=4"], "got 'rank=4'; supported: algo, preset, conv_dim"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_lycoris_options_that_do_not_fit_are_one_line_at_config_load(assets, tmp_path, case, capsys):  # noqa: F811
    extra, message = REFUSALS[case]
    err = refused_run(assets, tmp_path / "out", extra, capsys)
    assert message in err and "network_args" in err or "network_multiplier" in message, err


def test_the_lycoris_args_are_what_training_uses():
    from lora_sd.config import TrainConfig
    from lora_sd.training.network import network_spec

    spec = network_spec(TrainConfig(network_module="lycoris.kohya", network_args=[
        "algo=LoKr", "conv_dim=3", "conv_alpha=0.5", "factor=8", "decompose_both=True", "use_tucker=true",
        "rank_dropout=0.1", "module_dropout=0.2", "preset=full"]))
    assert spec == NetworkSpec(4, 1.0, 3, 0.5, algo="lokr", factor=8, decompose_both=True, use_tucker=True,
                               rank_dropout=0.1, module_dropout=0.2)
    assert network_spec(TrainConfig(network_module="lycoris.kohya", network_args=["algo=locon", "dora_wd=true"])) \
        == NetworkSpec(algo="lora", dora=True)
    assert network_spec(TrainConfig(network_module="lycoris.kohya")).algo == "lora"  # LyCORIS' default algo


KINDS = {  # name -> (spec, the PEFT parameter names a 3x3 conv gets)
    "loha": (NetworkSpec(4, 2, 2, 1, algo="loha"), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "loha_tucker": (NetworkSpec(4, 2, 2, 1, algo="loha", use_tucker=True),
                    {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    # the tiny convs' w2 [4, 4] splits at rank 1 only (below half its side)
    "lokr": (NetworkSpec(4, 2, 1, 1, algo="lokr"), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_both": (NetworkSpec(1, 1, 1, 1, algo="lokr", decompose_both=True, factor=4),
                  {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),  # factor 4 splits 8 channels 4 x 2: w1 [4, 4] split
    "lokr_tucker": (NetworkSpec(1, 1, 1, 1, algo="lokr", use_tucker=True),
                    {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "dora": (NetworkSpec(4, 2, 2, 1, dora=True), {"lora_A", "lora_B", "lora_magnitude_vector"}),
}


def adapted(tiny, spec):
    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    configs = lora_configs(unet, te, spec)
    unet.add_adapter(copy.deepcopy(configs["unet"]))  # PEFT rewrites a long target_modules list in place
    te.add_adapter(copy.deepcopy(configs["text_encoder"]))
    return configs, unet, te


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_starts_at_zero_on_the_networks_lora_targets(tiny, kind):
    """Same modules as networks.lora (3x3 convs at conv_dim), the kind's layers, and an untrained network
    changes nothing (LyCORIS' modules start at a zero delta)."""
    spec, conv_params = KINDS[kind]
    lora = lora_configs(tiny.unet, tiny.text_encoder, NetworkSpec(4, 2, 2, 1))
    configs, unet, te = adapted(tiny, spec)
    for part in ("unet", "text_encoder"):
        assert configs[part].target_modules == lora[part].target_modules
        assert configs[part].rank_pattern == {n: spec.conv_dim for n in lora[part].rank_pattern}
    conv = dict(unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert {n.split(".")[0] for n, _ in conv.named_parameters() if "base_layer" not in n} == conv_params
    if kind == "loha":
        assert conv.hada_w1_b["default"].shape[0] == 2 and conv.scaling["default"] == 0.5  # conv_dim, conv_alpha
    want, got = model_outputs(tiny), model_outputs(tiny, unet, te)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_lokr_scale_is_lycoris_alpha_over_rank_and_1_with_full_factors(tiny_sd1):
    """PEFT divides by r always; LyCORIS (and ComfyUI) ignore alpha when no factor is decomposed."""
    _, unet, _ = adapted(tiny_sd1, NetworkSpec(64, 2, algo="lokr"))  # 64 >= every factor side / 2: all full
    layer = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert set(layer.lokr_w1) == set(layer.lokr_w2) == {"default"} and layer.scaling["default"] == 1.0
    _, unet, _ = adapted(tiny_sd1, NetworkSpec(1, 2, algo="lokr"))  # rank 1: w2 decomposed
    layer = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert "default" in layer.lokr_w2_a and layer.scaling["default"] == 2.0


@pytest.mark.parametrize("kind", ["loha_tucker", "lokr_tucker", "loha", "lokr_both"])
def test_peft_layers_compute_the_lycoris_formula_tucker_included(tiny_sd1, kind):
    """PEFT's parameters carry LyCORIS' names and shapes: the delta PEFT applies equals adapter_math's (the
    formula ComfyUI applies to LyCORIS files), on a 3x3 conv and a Linear."""
    spec, _ = KINDS[kind]
    _, unet, _ = adapted(tiny_sd1, spec)
    gen = torch.Generator().manual_seed(0)
    for name in ("down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"):
        layer = dict(unet.named_modules())[name]
        tensors = {}
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                if "base_layer" not in pname:
                    p.copy_(torch.randn(p.shape, generator=gen))
                    tensors[pname.split(".")[0]] = p.detach().clone()
            peft_delta = layer.get_delta_weight("default")
        alpha = layer.alpha["default"]
        want = adapter_math.delta(spec.algo, tensors, alpha, tuple(layer.get_base_layer().weight.shape))
        assert torch.allclose(peft_delta, want, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_network_multiplier_scales_loha_and_lokr_layers(tiny_sd1, kind):
    """lora_strength (sd-scripts' set_multiplier) reaches LoHa/LoKr layers: at 0 the base model, and each
    layer's delta at 0.5 is half of it; restored after."""
    _, unet, te = adapted(tiny_sd1, KINDS[kind][0])
    with torch.no_grad():
        for pname, p in [*unet.named_parameters(), *te.named_parameters()]:
            if "hada_" in pname or "lokr_" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    layer = dict(unet.named_modules())["down_blocks.0.attentions.0.proj_in"]
    full, trained = layer.get_delta_weight("default"), model_outputs(tiny_sd1, unet, te)
    with lora_strength([unet, te], 0.5):
        assert torch.allclose(layer.get_delta_weight("default"), full * 0.5)
    with lora_strength([unet, te], 0.0):
        at_zero = model_outputs(tiny_sd1, unet, te)
    assert all(torch.equal(b, z) for b, z in zip(model_outputs(tiny_sd1), at_zero))
    assert all(torch.equal(t, a) for t, a in zip(trained, model_outputs(tiny_sd1, unet, te)))
    assert not torch.equal(trained[1], at_zero[1])


def test_the_example_config_loads_as_a_loha_network():
    from pathlib import Path

    from lora_sd.config import load_config
    from lora_sd.training.network import network_spec

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "loha_char.toml")
    assert network_spec(cfg) == NetworkSpec(8, 4.0, 4, 1.0, algo="loha")


def test_a_dora_network_refuses_another_strength(tiny_sd1):
    """PEFT's DoRA does not scale its magnitude with a strength (LyCORIS does): a dataset's network_multiplier
    with DoRA stops at the first step instead of training something else."""
    from lora_sd.errors import ConfigError

    _, unet, te = adapted(tiny_sd1, KINDS["dora"][0])
    with lora_strength([unet, te], 1.0):
        pass
    with pytest.raises(ConfigError, match="DoRA network trains at strength 1 only"):
        with lora_strength([unet, te], 0.5):
            pass
