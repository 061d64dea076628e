"""lora_sd.ops.lowrank: truncated SVDs against the Eckart-Young optimum."""

import pytest
import torch

from lora_sd.ops.lowrank import (
    approximation_error,
    as_matrix,
    factorize_product,
    optimal_error,
    to_lora_shapes,
    truncated_svd,
)


def _matrix(out_dim, in_dim, true_rank=24, noise=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(out_dim, true_rank, generator=gen) @ torch.randn(true_rank, in_dim, generator=gen)
    return low / true_rank**0.5 + noise * torch.randn(out_dim, in_dim, generator=gen)


@pytest.mark.parametrize("method", ["full", "randomized", "auto"])
@pytest.mark.parametrize("rank", [4, 12, 24])
def test_truncated_svd_within_one_percent_of_optimum(method, rank):
    m = _matrix(96, 288)  # a 3x3 conv [96, 32, 3, 3] as a matrix
    up, down = truncated_svd(m, rank, method)
    assert up.shape == (96, rank) and down.shape == (rank, 288)
    assert approximation_error(m, up, down) <= 1.01 * optimal_error(m, rank)


def test_factorize_product_is_exact_and_never_pads():
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(40, 6, generator=gen), torch.randn(6, 72, generator=gen)
    product = up @ down
    new_up, new_down = factorize_product(up, down, 3)
    assert approximation_error(product, new_up, new_down) == pytest.approx(optimal_error(product, 3), rel=1e-4)
    full_up, full_down = factorize_product(up, down, 10)  # more than the product's rank (6): no zero rows
    assert full_up.shape == (40, 6) and full_down.shape == (6, 72)
    assert torch.allclose(full_up @ full_down, product, atol=1e-4)


def test_conv_shapes_round_trip():
    delta = torch.randn(8, 4, 3, 3)
    up, down = truncated_svd(as_matrix(delta), 36, "full")  # clamped to 8
    down4, up4 = to_lora_shapes(up, down, delta.shape)
    assert down4.shape == (8, 4, 3, 3) and up4.shape == (8, 8, 1, 1)
    rebuilt = (up4.flatten(1) @ down4.flatten(1)).reshape(delta.shape)
    assert torch.allclose(rebuilt, delta, atol=1e-5)
