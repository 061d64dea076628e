"""recipes/svd_merge_lora.py and lora_sd.ops.svd_merge: per-module optimality against the summed deltas."""

import logging

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.formats import load_lora, save_lora
from lora_sd.ops import svd_merge
from lora_sd.ops.lowrank import approximation_error, as_matrix, optimal_error
from recipes.svd_merge_lora import main
from tests.helpers import max_diff, outputs_with_loras, random_lora

RATIOS = [0.7, 0.4]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loras(request, tmp_path_factory):
    """Two LoRAs of different ranks and alphas (conv_dim set), the second U-Net only, and their files."""
    tiny = request.getfixturevalue(f"tiny_{request.param}")
    a = random_lora(tiny, 4, 2, conv_dim=3, conv_alpha=1, seed=11, scale=0.3)
    b = random_lora(tiny, 6, 1, conv_dim=2, conv_alpha=4, seed=12, scale=0.3, train_text_encoder=False)
    d = tmp_path_factory.mktemp("svd")
    save_lora(a, d / "a.safetensors", version=request.param)
    save_lora(b, d / "b.safetensors", version=request.param)
    return tiny, a, b, d


def _summed(a, b, key):
    total = RATIOS[0] * a.modules[key].delta() if key in a.modules else 0
    return total + (RATIOS[1] * b.modules[key].delta() if key in b.modules else 0)


def test_full_rank_reproduces_summed_deltas(loras, tmp_path):
    tiny, a, b, d = loras
    out = tmp_path / "full.safetensors"
    main(["--save_to", str(out), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"),
          "--ratios", *map(str, RATIOS), "--new_rank", "10", "--new_conv_rank", "5"])
    merged = load_lora(out)
    assert set(merged.modules) == set(a.modules) | set(b.modules)  # TE modules only in a: kept
    for key, m in merged.modules.items():
        assert torch.allclose(m.delta(), _summed(a, b, key), atol=1e-5), key
    assert max_diff(outputs_with_loras(tiny, [merged], [1.0]), outputs_with_loras(tiny, [a, b], RATIOS)) <= 1e-4


def test_lower_rank_is_optimal_per_module(loras):
    tiny, a, b, _ = loras
    merged = svd_merge([a, b], RATIOS, new_rank=3, new_conv_rank=2)
    convs = 0
    for key, m in merged.modules.items():
        target = as_matrix(_summed(a, b, key))
        is_conv = m.down.dim() == 4 and m.down.shape[-1] == 3
        convs += is_conv
        rank = min(2 if is_conv else 3, *target.shape)
        assert m.rank == rank, key
        err = approximation_error(target, m.up.flatten(1) * m.scale, m.down.flatten(1))
        assert err <= 1.01 * optimal_error(target, rank) + 1e-7, key
    assert convs > 0
    assert {m.alpha for m in merged.modules.values()} == {3.0}  # one alpha per file (diffusers reads no other)


def test_rank_above_what_the_merge_can_have_is_clamped_without_zero_rows(loras, caplog):
    """Per module the merged delta has rank <= min(sum of the input ranks, out, in*k*k): that is the
    rank written (no zero rows), the delta is unchanged, and one warning gives the counts."""
    _, a, b, _ = loras
    with caplog.at_level(logging.WARNING, logger="lora_sd.ops.svd_merge"):
        merged = svd_merge([a, b], RATIOS, new_rank=64, new_conv_rank=64)
    n = len(merged.modules)
    warnings = [r.getMessage() for r in caplog.records if "clamped" in r.getMessage()]
    assert len(warnings) == 1 and f"{n} of {n} module(s) clamped" in warnings[0]
    below_size = 0
    for key, m in merged.modules.items():
        total = sum(x.modules[key].rank for x in (a, b) if key in x.modules)
        size = min(m.up.shape[0], m.down[0].numel())
        below_size += total < size
        assert m.rank == min(total, size), key
        assert m.down.flatten(1).norm(dim=1).min() > 1e-6 and m.up.flatten(1).norm(dim=0).min() > 1e-6, key
        assert torch.allclose(m.delta(), _summed(a, b, key), atol=1e-5), key
    assert below_size > 0  # the sum of ranks, not only the module's size, limits some modules
    assert len({m.alpha for m in merged.modules.values()}) == 1  # clamped ranks, one alpha: scales in the ups
    linear = [m.rank for m in merged.modules.values() if not m.is_3x3]
    assert merged.metadata["ss_network_dim"] == str(max(linear))


@pytest.mark.parametrize("extra, message", [
    (["--new_rank", "0"], "--new_rank: must be a positive"),
    (["--new_rank", "4", "--ratios", "1"], "--ratios: 1 value(s) for 2"),
    (["--new_rank", "4", "--precision", "fp8"], "--precision"),
])
def test_bad_input_one_line_nothing_written(loras, tmp_path, capsys, extra, message):
    _, _, _, d = loras
    out = tmp_path / "o.safetensors"
    rc = run_main(main, ["--save_to", str(out), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(loras, tmp_path, capsys):
    _, _, _, d = loras
    out = tmp_path / "o.safetensors"
    rc = run_main(main, ["--save_to", str(out), "--models", str(d / "a.safetensors"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU" in err and not out.exists()


def test_precision_rounds_the_inputs(loras, tmp_path):
    """--precision bf16: the merge is that of the scaled factors rounded to bf16 (full rank: exactly their sum)."""
    _, a, b, d = loras
    out = tmp_path / "bf16.safetensors"
    main(["--save_to", str(out), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"),
          "--ratios", *map(str, RATIOS), "--new_rank", "10", "--new_conv_rank", "5", "--precision", "bf16"])
    merged = load_lora(out)
    far = 0
    for key, m in merged.modules.items():
        parts = [(r, x.modules[key]) for r, x in zip(RATIOS, (a, b), strict=True) if key in x.modules]
        want = sum((x.up.flatten(1) * (r * x.scale)).bfloat16().float() @ x.down.flatten(1).bfloat16().float()
                   for r, x in parts)
        got = m.delta().flatten(1)
        assert torch.allclose(got, want, atol=1e-5), key
        far += (got - as_matrix(_summed(a, b, key))).abs().max().item() > 1e-4
    assert far > len(merged.modules) // 2  # bf16 rounding is visible
