"""recipes/resize_lora.py and lora_sd.ops.resize: optimal per module, sd-scripts' dynamic ranks, loads in diffusers.

References: each module's delta from `kind_formulas` (not our adapter_math), truncated with torch.linalg.svd;
dynamic ranks worked out by hand from sd-scripts' definitions on spectra built with known singular values.
"""

import copy

import pytest
import torch

from lora_sd.formats import load_lora, save_lora
from lora_sd.lora_weights import LoraModule, LoraWeights
from lora_sd.ops.merge import merge_into_models
from lora_sd.ops.resize import resize_lora
from recipes import resize_lora as recipe
from tests import kind_formulas
from tests.helpers import fresh_pipeline, max_diff, model_outputs, one_error_line, random_lora, random_lycoris


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `delta` (Eckart-Young), in float64, shaped like it."""
    u, s, vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
    return (u[:, :rank] * s[:rank] @ vh[:rank]).reshape(delta.shape)


@pytest.fixture(scope="module")
def lora_file(tiny_sd1, tmp_path_factory):
    """A kohya LoRA: rank 4 / alpha 2, 3x3 convs rank 3 / alpha 1, with a training comment."""
    lora = random_lora(tiny_sd1, network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1, scale=0.3)
    lora.metadata["ss_training_comment"] = "trained on cats"
    return save_lora(lora, tmp_path_factory.mktemp("in") / "lora.safetensors")


def test_fixed_rank_is_the_optimal_truncated_svd(lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    recipe.main(["--model", str(lora_file), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1"])
    original, resized = load_lora(lora_file), load_lora(out)
    assert resized.modules.keys() == original.modules.keys()
    for key, m in original.modules.items():
        r = resized.modules[key]
        shape = m.weight_shape()
        want_rank = 1 if m.is_3x3 else 2
        assert r.kind == "lora" and r.rank == want_rank and r.weight_shape() == shape, key
        # one alpha, sd-scripts' for --new_rank: the common scale 2 / 4 times 2 (3x3 convs' scale is in up)
        assert r.alpha == 1.0, key
        want = truncated(kind_formulas.delta(m, shape), want_rank)
        got = kind_formulas.delta(r, shape).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), key
    meta = resized.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2 (conv: 1); trained on cats"


def test_rank_at_or_above_the_input_keeps_every_delta(lora_file, tmp_path, caplog):
    """Asking for more than a module's delta has gives that delta exactly (the scale kept), no zero rows."""
    out = tmp_path / "same.safetensors"
    recipe.main(["--model", str(lora_file), "--save_to", str(out), "--new_rank", "8"])
    original, resized = load_lora(lora_file), load_lora(out)
    for key, m in original.modules.items():
        r = resized.modules[key]
        assert r.rank == m.rank, key
        assert max_diff([kind_formulas.delta(r, m.weight_shape())], [kind_formulas.delta(m, m.weight_shape())]) < 1e-5
    assert "kept a lower rank than asked for" in caplog.text


def spectrum_module(s, out=16, inp=12, alpha=None, seed=0) -> LoraModule:
    """A LoRA module whose delta has exactly the singular values `s` (alpha / rank = alpha / len(s))."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, len(s), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, len(s), generator=gen, dtype=torch.float64))[0]
    rank = len(s)
    alpha = alpha if alpha is not None else rank
    up = u * torch.tensor(s, dtype=torch.float64) * (rank / alpha)  # the delta's singular values are `s`
    return LoraModule(v.T.float().contiguous(), up.float(), float(alpha))


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
# By hand from sd-scripts' definitions on SPECTRUM:
# sv_ratio p: count(S > 8 / p); sv_fro p: fewest with cumsum(S^2) / 85.3125 >= p^2 (64, 80, 84, 85, ...);
# sv_cumulative p: fewest with cumsum(S) / 15.75 >= p (8, 12, 14, 15, 15.5, 15.75).
DYNAMIC_CASES = [
    ("sv_ratio", 5.0, 8, 3), ("sv_ratio", 10.0, 8, 4), ("sv_ratio", 1.0, 8, 1), ("sv_ratio", 100.0, 8, 6),
    ("sv_fro", 0.95, 8, 2), ("sv_fro", 0.99, 8, 3), ("sv_fro", 1.0, 8, 6),
    ("sv_cumulative", 0.5, 8, 1), ("sv_cumulative", 0.9, 8, 4), ("sv_cumulative", 0.96, 8, 5),
    ("sv_cumulative", 0.9, 3, 3),  # capped at --new_rank
]


@pytest.mark.parametrize("method,param,new_rank,want", DYNAMIC_CASES)
def test_dynamic_methods_pick_the_ranks_their_definitions_give(method, param, new_rank, want):
    lora = LoraWeights({"unet.a": spectrum_module(SPECTRUM), "unet.b": spectrum_module(SPECTRUM, alpha=3.0, seed=1),
                        "unet.c": spectrum_module(SPECTRUM, seed=2)})
    resized, stats = resize_lora(lora, new_rank, dynamic_method=method, dynamic_param=param)
    for key, m in lora.modules.items():
        r = resized.modules[key]
        assert r.rank == want, (key, r.rank)
        assert r.alpha == new_rank  # one alpha: the common scale 1 times --new_rank; unet.b's scale 1/2 in up
        assert (r.delta().double() - truncated(m.delta(), want)).abs().max() < 1e-5
    assert resized.metadata["ss_network_dim"] == "Dynamic"
    assert resized.metadata["ss_training_comment"].startswith(f"Dynamic resize with {method}: {param:g} from 6; ")


def test_verbose_prints_rank_and_retained_frobenius_fraction(tmp_path, capsys):
    path = save_lora(LoraWeights({"unet.down_blocks.0.attentions.0.proj_in": spectrum_module(SPECTRUM)}),
                     tmp_path / "s.safetensors")
    recipe.main(["--model", str(path), "--save_to", str(tmp_path / "o.safetensors"), "--dynamic_method", "sv_fro",
                 "--dynamic_param", "0.95", "--new_rank", "8", "--verbose"])
    out = capsys.readouterr().out
    # rank 2 keeps sqrt(80 / 85.3125) = 96.8% of the Frobenius norm, sum 12 / 15.75 = 76.2%, S[0] / S[1] = 2
    assert "rank 6 -> 2, sum(S) retained: 76.2%, fro retained: 96.8%, max(S) ratio: 2.0, dynamic | dim: 2" in out
    assert "Average Frobenius norm retention: 96.84%" in out


def test_resized_file_loads_in_diffusers_equal_to_our_merge(tiny_sd1, lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    recipe.main(["--model", str(lora_file), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "2"])
    pipe = fresh_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(out))
    got = model_outputs(tiny_sd1, unet=pipe.unet, text_encoder=pipe.text_encoder)
    unet, te = copy.deepcopy(tiny_sd1.unet), copy.deepcopy(tiny_sd1.text_encoder)
    merge_into_models([load_lora(out)], [1.0], {"unet": unet, "text_encoder": te})
    want = model_outputs(tiny_sd1, unet=unet, text_encoder=te)
    assert max_diff(got, want) < 1e-5
    assert max_diff(want, model_outputs(tiny_sd1)) > 1e-4  # the resized LoRA does something


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_become_the_best_plain_lora(tiny_sd1, kind, tmp_path):
    lycoris = random_lycoris(tiny_sd1, kind, rank=2, alpha=1.5, **({"lokr": "w2"} if kind == "lokr" else {}))
    path = save_lora(lycoris, tmp_path / f"{kind}.safetensors")
    out = tmp_path / "lora.safetensors"
    recipe.main(["--model", str(path), "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "2"])
    original, resized = load_lora(path), load_lora(out)
    assert resized.metadata["ss_network_module"] == "networks.lora" and "algo" not in resized.metadata.get(
        "ss_network_args", "")
    for key, m in original.modules.items():
        r = resized.modules[key]
        shape = m.weight_shape()
        want = kind_formulas.delta(m, shape).double()
        # a LoKr of a 1 x c factor has a delta of rank 2 (float32's tolerance: the delta is float32)
        rank = min(2 if m.is_3x3 else 3, int(torch.linalg.matrix_rank(want.float().flatten(1))))
        assert r.kind == "lora" and r.rank == rank and r.alpha == 3, key  # scale 1 at --new_rank
        best = truncated(want, rank)
        assert (kind_formulas.delta(r, shape).double() - best).abs().max() <= 1e-5 * want.abs().max(), key


def test_dora_is_refused(tiny_sd1, tmp_path, capsys):
    path = save_lora(random_lycoris(tiny_sd1, "lora", dora="output"), tmp_path / "dora.safetensors")
    out = tmp_path / "o.safetensors"
    line = one_error_line(recipe, ["--model", path, "--save_to", out], capsys)
    assert "DoRA" in line and "base model's weight" in line and str(path) in line
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--new_rank", "0"], "--new_rank: must be a positive whole number"),
    (["--new_rank", "-2"], "--new_rank: must be a positive whole number"),
    (["--new_conv_rank", "0"], "--new_conv_rank: must be a positive whole number"),
    (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "--dynamic_param 1.5: sv_fro"),
    (["--dynamic_method", "sv_cumulative", "--dynamic_param", "0"], "--dynamic_param 0.0: sv_cumulative"),
    (["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "it must be >= 1"),
    (["--dynamic_method", "sv_fro"], "--dynamic_param: a number is needed"),
    (["--dynamic_method", "svd"], "--dynamic_method svd: must be one of"),
    (["--dynamic_param", "0.5"], "only used with --dynamic_method"),
    (["--save_precision", "fp8"], "--save_precision"),
])
def test_bad_input_one_line_nothing_written(lora_file, tmp_path, capsys, extra, message):
    out = tmp_path / "o.safetensors"
    assert message in one_error_line(recipe, ["--model", lora_file, "--save_to", out, *extra], capsys)
    assert not out.exists()


def test_missing_input_and_overwriting_it_refused(lora_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert "missing.safetensors" in one_error_line(
        recipe, ["--model", tmp_path / "missing.safetensors", "--save_to", out], capsys)
    assert not out.exists()
    before = lora_file.read_bytes()
    assert "--save_to" in one_error_line(recipe, ["--model", lora_file, "--save_to", lora_file], capsys)
    assert lora_file.read_bytes() == before


def test_dynamic_resize_loads_in_diffusers_equal_to_our_merge(tiny_sd1, lora_file, tmp_path):
    """Dynamic ranks give modules different ranks and alphas: diffusers must still apply each one's own."""
    out = tmp_path / "dyn.safetensors"
    recipe.main(["--model", str(lora_file), "--save_to", str(out), "--dynamic_method", "sv_fro", "--dynamic_param",
                 "0.9"])
    resized = load_lora(out)
    assert len({m.rank for m in resized.modules.values()}) > 1
    pipe = fresh_pipeline(tiny_sd1)
    pipe.load_lora_weights(str(out))
    got = model_outputs(tiny_sd1, unet=pipe.unet, text_encoder=pipe.text_encoder)
    unet, te = copy.deepcopy(tiny_sd1.unet), copy.deepcopy(tiny_sd1.text_encoder)
    merge_into_models([resized], [1.0], {"unet": unet, "text_encoder": te})
    assert max_diff(got, model_outputs(tiny_sd1, unet=unet, text_encoder=te)) < 1e-5


def test_sdxl_lora_resized_loads_in_diffusers_equal_to_our_merge(tmp_path):
    """Both text encoders and SDXL's original-layout U-Net names survive; diffusers' SDXL pipeline agrees."""
    from lora_sd.tiny import build_tiny_sd
    from tests.test_sdxl_ops import diffusers_outputs, outputs, sdxl_lora

    base = build_tiny_sd("sdxl")
    path = save_lora(sdxl_lora(base, 4, 2, 2, 1, seed=1), tmp_path / "xl.safetensors", version="sdxl")
    out = tmp_path / "small.safetensors"
    recipe.main(["--model", str(path), "--save_to", str(out), "--dynamic_method", "sv_ratio", "--dynamic_param", "3"])
    resized = load_lora(out)
    assert resized.components == ["unet", "text_encoder", "text_encoder_2"]
    assert resized.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    parts = {p: copy.deepcopy(getattr(base, p)) for p in resized.components}
    merge_into_models([resized], [1.0], parts)
    want = outputs(parts["unet"], parts["text_encoder"], parts["text_encoder_2"], base.tokenizer, base.tokenizer_2)
    assert max_diff(diffusers_outputs(base, [out], [1.0]), want) < 1e-5


def test_save_precision(lora_file, tmp_path):
    import safetensors.torch

    out = tmp_path / "half.safetensors"
    recipe.main(["--model", str(lora_file), "--save_to", str(out), "--save_precision", "fp16"])
    assert {t.dtype for t in safetensors.torch.load_file(str(out)).values()} == {torch.float16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_cuda_without_gpu(lora_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert "no CUDA GPU" in one_error_line(recipe, ["--model", lora_file, "--save_to", out, "--device", "cuda"], capsys)
    assert not out.exists()
