"""Low-rank math on weight deltas: tensors in, tensors out.

A weight delta is a Linear weight [out, in] or a conv weight [out, in, k, k];
convolutions are factorized as the matrix [out, in*k*k] (what a LoRA's
down [r, in, k, k] / up [out, r, 1, 1] pair multiplies out to). The singular
values go into `up`, as sd-scripts does: delta ~= up @ down at scale 1.

Three ways to a truncated SVD, all returning the same factors:
- `full`: `torch.linalg.svd`, the reference;
- `randomized`: `torch.svd_lowrank` (Halko et al.) with oversampling and power
  iterations, for a full matrix whose rank is much larger than the one kept
  (extraction from two models);
- `factorize_product` (`product_svd` for the singular values too): exact and
  cheap when the matrix is given as a product of thin factors (a sum of
  LoRAs): QR of each factor, then the SVD of a small core matrix.
`svd_factors` is the full SVD without the numerically zero directions (SVD
merge of a summed LoHa/LoKr delta: never zero rows, like `factorize_product`).
"""

import math

import torch

METHODS = ("auto", "full", "randomized")
# Randomized SVD: rank + OVERSAMPLE_FACTOR * rank + OVERSAMPLE random directions and
# POWER_ITERATIONS subspace iterations. Measured on 1280x11520 deltas (rank 64 + noise,
# ranks 16..48 kept): error within 0.2% of the optimum; rank + 10 directions gave ~1%.
OVERSAMPLE_FACTOR = 1
OVERSAMPLE = 10
POWER_ITERATIONS = 4


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] for a Linear weight, [out, in*k*k] for a conv weight."""
    return weight.flatten(1)


def max_rank(weight_shape) -> int:
    """The largest rank a delta of this shape can have."""
    return min(weight_shape[0], math.prod(weight_shape[1:]))


def to_lora_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape):
    """(down, up), contiguous, shaped for a module whose weight has `weight_shape` (convs: 4-D)."""
    if len(weight_shape) == 4:
        down, up = down.reshape(down.shape[0], *weight_shape[1:]), up.reshape(*up.shape, 1, 1)
    return down.contiguous(), up.contiguous()


def truncated_svd(matrix: torch.Tensor, rank: int, method: str = "auto", niter: int = POWER_ITERATIONS):
    """(up [out, rank], down [rank, in]) with up @ down the best rank-`rank` approximation.

    `auto` uses the randomized SVD when the rank kept (plus oversampling) is
    under half the matrix's smaller side, the full SVD otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rank = min(rank, min(matrix.shape))
    q = rank * (1 + OVERSAMPLE_FACTOR) + OVERSAMPLE
    if method == "randomized" or (method == "auto" and q < min(matrix.shape) // 2):
        q = min(q, min(matrix.shape))
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def svd_factors(matrix: torch.Tensor, rank: int):
    """(up [out, r], down [r, in]): the best rank-`rank` approximation by a full SVD, r also cut to the
    matrix's numerical rank (torch.linalg.matrix_rank's tolerance; at least 1), so no zero rows are kept."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, numerical_rank(s, matrix.shape))
    return u[:, :rank] * s[:rank], vh[:rank]


def product_svd(up: torch.Tensor, down: torch.Tensor):
    """(u [out, k], s [k], vh [k, in]): the thin SVD of `up @ down` (up [out, n], down [n, in]), s descending.

    When the inner size n is below the product's possible rank, without forming it: QR of both thin
    factors, then the SVD of the small [n, n] core, at O((out + in) n^2) instead of O(out * in * min(out, in));
    otherwise the full SVD of the product. k = min(n, out, in) or min(out, in).
    """
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        return torch.linalg.svd(up @ down, full_matrices=False)
    q_u, r_u = torch.linalg.qr(up)  # [out, n'], [n', n]
    q_d, r_d = torch.linalg.qr(down.T)  # [in, n''], [n'', n]
    u, s, vh = torch.linalg.svd(r_u @ r_d.T, full_matrices=False)
    return q_u @ u, s, vh @ q_d.T


def numerical_rank(s: torch.Tensor, shape) -> int:
    """How many singular values `s` (descending) of a matrix of `shape` are above torch.linalg.matrix_rank's
    tolerance; at least 1."""
    tol = s[0] * max(shape) * torch.finfo(s.dtype).eps
    return max(1, int((s > tol).sum()))


def factorize_product(up: torch.Tensor, down: torch.Tensor, rank: int):
    """Exact truncated SVD of `up @ down` (up [out, k], down [k, in]) without forming it (`product_svd`).

    The optimum of the Eckart-Young theorem. Returns (up [out, r], down [r, in]) with r = min(rank, k, out,
    in): never padded with zero rows (a caller wanting more gets the product's full rank).
    """
    u, s, vh = product_svd(up, down)
    return (u * s)[:, :rank], vh[:rank]


def approximation_error(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """Frobenius norm of matrix - up @ down."""
    return torch.linalg.matrix_norm(matrix.double() - up.double() @ down.double()).item()


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    """The smallest Frobenius error any rank-`rank` approximation can have (Eckart-Young).

    Computed in float64: float32 singular values are not accurate enough for a
    small tail under a large head.
    """
    s = torch.linalg.svdvals(matrix.double())
    return s[rank:].square().sum().sqrt().item()
