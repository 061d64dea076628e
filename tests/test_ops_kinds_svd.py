"""SVD merge of LoHa / LoKr with LoRAs into one plain LoRA (optimal rank-R fit of the summed delta), and the
refusals: DoRA in an SVD merge, LoHa / LoKr / DoRA in a LoRA + LoRA merge."""

import logging
import math

import pytest
import torch

from lora_sd.errors import ConfigError
from lora_sd.lora_weights import LoraModule, LoraWeights
from lora_sd.ops import merge_loras, svd_merge
from lora_sd.ops.gather import _report_idle_modules
from tests import kind_formulas
from tests.helpers import random_lora, random_lycoris, random_module

RATIOS = [0.7, -0.4]
RANK, CONV_RANK = 3, 2


def _summed(loras, key, shape):
    """sum_i ratio_i * dW_i as [out, in*k*k], by the published formulas."""
    return sum(r * kind_formulas.delta(lo.modules[key], shape) for r, lo in zip(RATIOS, loras) if key in lo.modules).flatten(1)


def _optimal_error(matrix, rank):
    """Eckart-Young: the smallest Frobenius error of any rank-`rank` matrix, from the singular values."""
    s = torch.linalg.svd(matrix.double(), full_matrices=False).S
    return s[rank:].square().sum().sqrt().item()


@pytest.mark.parametrize("kind, args", [("loha", {}), ("loha", {"tucker": True}), ("lokr", {"lokr": "w2"}),
                                        ("lokr", {"lokr": "full"})])
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_svd_merge_with_a_lora_is_within_1pct_of_the_optimum(request, version, kind, args):
    tiny = request.getfixturevalue(f"tiny_{version}")
    other = random_lycoris(tiny, kind, rank=2, alpha=1.0, seed=1, **args)
    lora = random_lora(tiny, 4, 2, conv_dim=3, conv_alpha=1, seed=2, scale=0.3)
    merged = svd_merge([other, lora], RATIOS, new_rank=RANK, new_conv_rank=CONV_RANK)
    assert set(merged.modules) == set(other.modules) and merged.metadata["ss_network_module"] == "networks.lora"
    convs = 0
    for key, m in merged.modules.items():
        shape = other.modules[key].shape
        is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        convs += is_3x3
        assert m.kind == "lora" and m.dora_scale is None and m.rank == (CONV_RANK if is_3x3 else RANK), key
        assert tuple(m.down.shape[1:]) == tuple(shape[1:]) and tuple(m.up.shape[2:]) == (1, 1) * (len(shape) == 4), key
        target = _summed([other, lora], key, shape)
        got = kind_formulas.lora_delta(m.named_tensors(), m.alpha, target.shape)
        err = torch.linalg.matrix_norm(target.double() - got.double()).item()
        assert err <= 1.01 * _optimal_error(target, m.rank) + 1e-6, key
    assert convs > 0


def test_full_rank_reproduces_the_sum_and_the_kernel_comes_from_another_input(tiny_sd1):
    """A LoHa whose 3x3 convs are flattened with no `shape` merges with a LoRA that gives the kernel; at a rank
    as large as the module the merge is exact."""
    loha = random_lycoris(tiny_sd1, "loha", rank=2, alpha=1.0, seed=3, set_shape=False, components=("unet",))
    lora = random_lora(tiny_sd1, 2, 1, conv_dim=2, conv_alpha=1, seed=4, train_text_encoder=False)
    merged = svd_merge([loha, lora], RATIOS, new_rank=1000, new_conv_rank=1000)
    for key, m in merged.modules.items():
        shape = lora.modules[key].weight_shape()
        assert tuple(m.down.shape[1:]) == tuple(shape[1:]), key
        want = _summed([loha, lora], key, (shape[0], math.prod(shape[1:])))
        assert torch.allclose(kind_formulas.lora_delta(m.named_tensors(), m.alpha, want.shape), want, atol=1e-5), key


def test_flattened_conv_without_a_kernel_is_refused(tiny_sd1):
    loha = random_lycoris(tiny_sd1, "loha", seed=3, set_shape=False, components=("unet",))
    with pytest.raises(ConfigError, match=r"^module unet\.\S+\.conv[12]?: a 3x3 conv whose LoHa tensors are flattened"):
        svd_merge([loha], [1.0], new_rank=2)


def test_rank_above_the_deltas_numerical_rank_is_clamped(caplog):
    """A rank-1 LoHa's delta has rank 1 (a Hadamard product of rank-1 matrices): asked for 4, rank 1 is
    written, exact, without zero rows."""
    m = random_module("loha", (8, 16), rank=1, alpha=1.0)
    with caplog.at_level(logging.WARNING, logger="lora_sd.ops.svd_merge"):
        merged = svd_merge([LoraWeights({"unet.x": m})], [1.0], new_rank=4)
    got = merged.modules["unet.x"]
    assert got.rank == 1 and any("clamped" in r.getMessage() for r in caplog.records)
    assert torch.allclose(kind_formulas.lora_delta(got.named_tensors(), got.alpha, (8, 16)),
                          kind_formulas.delta(m, (8, 16)), atol=1e-6)


def _dora(seed=0):
    return LoraWeights({"unet.x": random_module("lora", (8, 16), dora="output", gen=torch.Generator().manual_seed(seed))})


def test_svd_merge_refuses_dora():
    plain = LoraWeights({"unet.x": random_module("lora", (8, 16))})
    with pytest.raises(ConfigError) as e:
        svd_merge([plain, _dora()], [1.0, 1.0], new_rank=2, names=["a.safetensors", "d.safetensors"])
    message = str(e.value)
    assert message.startswith("d.safetensors: module unet.x is a LoRA (DoRA)") and "--sd_model" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", ["exact", "kohya"])
@pytest.mark.parametrize("second, advice", [("loha", "svd_merge_lora.py"), ("lokr", "svd_merge_lora.py"),
                                            ("dora", "--sd_model")])
def test_lora_merge_refuses_other_kinds_naming_the_file(mode, second, advice):
    """LoRA + LoHa (or LoKr, DoRA): refused, naming the file and module and where to go instead."""
    first = LoraWeights({"unet.x": random_module("lora", (8, 16))})
    other = _dora() if second == "dora" else LoraWeights({"unet.x": random_module(second, (8, 16))})
    with pytest.raises(ConfigError) as e:
        merge_loras([first, other], [1.0, 1.0], mode=mode, names=["a.safetensors", "b.safetensors"])
    message = str(e.value)
    assert message.startswith("b.safetensors: module unet.x is a ") and advice in message and "\n" not in message


def test_idle_modules_of_every_kind_are_reported(caplog):
    """An untrained LoHa (hada_w2_a all zero, as LyCORIS initialises it) and a LoKr at alpha 0 change nothing:
    reported, not an AttributeError; a LoKr with both factors full ignores alpha (scale 1): not reported."""
    loha = random_module("loha", (8, 16))
    loha.tensors["hada_w2_a"] = torch.zeros_like(loha.tensors["hada_w2_a"])
    lora = LoraWeights({"unet.a": loha, "unet.b": random_module("lokr", (8, 16), lokr="w2", alpha=0.0),
                        "unet.c": random_module("lokr", (8, 16), lokr="full", alpha=0.0)})
    with caplog.at_level(logging.WARNING):
        _report_idle_modules(lora, "x.safetensors")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "e.g. unet.b" in warned[0] and "alpha 0" in warned[0] and "e.g. unet.a" in warned[1]
    assert all("1 of 3" in w for w in warned)


def test_modules_of_different_shapes_are_refused_across_kinds():
    """A LoHa and a LoRA for the same key but different layers (SD 1.x vs 2.x): one line naming both."""
    loha = LoraWeights({"unet.x": random_module("loha", (8, 16))})
    lora = LoraWeights({"unet.x": LoraModule(torch.randn(2, 32), torch.randn(8, 2), 1.0)})
    with pytest.raises(ConfigError, match=r"module unet.x: a.safetensors has LoHa .* but b.safetensors has LoRA"):
        svd_merge([loha, lora], [1.0, 1.0], new_rank=2, names=["a.safetensors", "b.safetensors"])
