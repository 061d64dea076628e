"""recipes/train.py with lycoris.kohya networks (LoHa, LoKr full and decomposed, DoRA, LoCon) on the tiny SD 1.x,
SD 2.x and SDXL: the saved file, reloaded by our loader onto a fresh model, reproduces the trained model; the
metadata sd-scripts + LyCORIS write; overfitting; resume; network_weights of every kind.

Each run is a few steps through `main(argv)` (tests/test_train.py's assets and args).
"""

import copy
import json

import pytest
import torch

from lora_sd.cli import run_main
from lora_sd.formats import load_lora
from tests.helpers import model_outputs
from tests.test_sdxl_train import unet_inputs, xl_assets  # noqa: F401 (session fixture)
from tests.test_train import (args, assets, fixed_batch_loss, kohya_file, make_assets,  # noqa: F401 (fixture)
                              one_image_dataset, train_recipe)

LYCORIS = ("--network_module", "lycoris.kohya", "--network_args")

RUNS = {  # name -> (network options, the kind of every saved module, whether they carry DoRA's magnitude)
    "loha_tucker": (["--network_dim", "4", "--network_alpha", "2", *LYCORIS, "algo=loha", "conv_dim=2",
                     "conv_alpha=1", "use_tucker=true", "rank_dropout=0.1", "module_dropout=0.1"], "loha", False),
    "lokr_full": (["--network_dim", "10000", "--network_alpha", "1", *LYCORIS, "algo=lokr"], "lokr", False),
    "lokr_decomposed": (["--network_dim", "1", "--network_alpha", "2", *LYCORIS, "algo=lokr", "factor=4",
                         "decompose_both=true", "conv_dim=1", "conv_alpha=1"], "lokr", False),
    "dora": (["--network_dim", "4", "--network_alpha", "2", *LYCORIS, "algo=locon", "dora_wd=true", "conv_dim=2"],
             "lora", True),
}
SD2_RUNS = ["loha_tucker", "lokr_decomposed", "dora"]


@pytest.fixture(scope="session")
def sd2_assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train_kinds_sd2"), "sd2")


def fresh(version):
    from lora_sd.tiny import build_tiny_sd

    return build_tiny_sd(version)  # the weights save_tiny_diffusers wrote for the run (seed 0)


def reloaded_outputs(path, tiny):
    """model_outputs of fresh copies of tiny's models carrying the file `path` (our loader + apply_to)."""
    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    load_lora(path).apply_to(unet=unet, text_encoder=te)
    return model_outputs(tiny, unet, te)


def check_run_file(result, path, tiny, kind, dora, given_args):
    lora = load_lora(path)
    assert {(m.kind, m.dora_scale is not None) for m in lora.modules.values()} == {(kind, dora)}
    assert any(m.is_3x3 for m in lora.modules.values()) == any(a.startswith("conv_dim") for a in given_args)
    result.unet.eval(), result.text_encoder.eval()  # rank/module dropout off, as in use
    want, got = model_outputs(tiny, result.unet, result.text_encoder), reloaded_outputs(path, tiny)
    assert all((w - g).abs().max() <= 1e-5 for w, g in zip(want, got))
    assert not torch.equal(want[1], model_outputs(tiny)[1])  # the network trained: not a no-op
    return lora


@pytest.mark.parametrize("version,case", [("sd1", c) for c in RUNS] + [("sd2", c) for c in SD2_RUNS])
def test_saved_file_reproduces_the_trained_model(request, tmp_path, version, case):
    """The kohya file (LyCORIS names) read back by load_lora onto a fresh model gives the trained model's outputs
    (text encoder and U-Net, <= 1e-5); its metadata is what sd-scripts + LyCORIS write."""
    extra, kind, dora = RUNS[case]
    run_assets = request.getfixturevalue("assets" if version == "sd1" else "sd2_assets")
    argv = args(run_assets, tmp_path / "out", *extra, *(["--v2"] if version == "sd2" else []))
    result = train_recipe.main(argv)
    path = tmp_path / "out" / "lora.safetensors"
    check_run_file(result, path, fresh(version), kind, dora, extra)
    _, meta = kohya_file(path)
    given = {a.split("=")[0]: a.split("=")[1] for a in extra[extra.index("--network_args") + 1:]}
    assert meta["ss_network_module"] == "lycoris.kohya"  # and the network options, as sd-scripts writes them
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == tuple(extra[i + 1] for i in (0, 2))
    assert json.loads(meta["ss_network_args"]) == {**given, **({"wd_on_output": "True"} if dora else {})}
    if case == "loha_tucker":  # the dropouts reach PEFT's layers (and are off in eval above)
        layer = dict(result.unet.named_modules())["down_blocks.0.attentions.0.proj_in"]
        assert layer.rank_dropout["default"] == 0.1 and layer.module_dropout["default"] == 0.1
        assert "hada_t1" in next(m for m in load_lora(path).modules.values() if m.is_3x3).tensors


@pytest.mark.parametrize("case", list(RUNS))
def test_network_from_trained_models_reproduces_them(assets, tmp_path, tiny_sd1, monkeypatch, case):  # noqa: F811
    """The LoraWeights a save is given (from_peft_models), applied to a fresh model (apply_to), gives the trained
    outputs: the training side of every kind, whatever file format writes it."""
    from lora_sd.training import checkpoint

    saved = []
    monkeypatch.setattr(checkpoint, "write_lora", lambda lora, path, *a, **k: saved.append(lora) or path)
    extra, kind, dora = RUNS[case]
    result = train_recipe.main(args(assets, tmp_path / "out", *extra))
    lora = saved[-1]
    assert {(m.kind, m.dora_scale is not None) for m in lora.modules.values()} == {(kind, dora)}
    unet, te = copy.deepcopy(tiny_sd1.unet), copy.deepcopy(tiny_sd1.text_encoder)
    lora.apply_to(unet=unet, text_encoder=te)
    result.unet.eval(), result.text_encoder.eval()
    want, got = model_outputs(tiny_sd1, result.unet, result.text_encoder), model_outputs(tiny_sd1, unet, te)
    assert all((w - g).abs().max() <= 1e-5 for w, g in zip(want, got))
    assert not torch.equal(want[1], model_outputs(tiny_sd1)[1])


def test_peft_folder_of_a_lokr_run_reproduces_the_trained_model(assets, tmp_path, tiny_sd1):  # noqa: F811
    extra, kind, dora = RUNS["lokr_full"]
    result = train_recipe.main(args(assets, tmp_path / "out", *extra, "--save_model_as", "peft"))
    check_run_file(result, tmp_path / "out" / "lora", tiny_sd1, kind, dora, extra)


def test_sdxl_loha_file_reproduces_the_trained_model(xl_assets, tmp_path):  # noqa: F811
    extra = ["--network_dim", "2", "--network_alpha", "1", *LYCORIS, "algo=loha", "conv_dim=2"]
    result = train_recipe.main(args(xl_assets, tmp_path / "out", *extra, "--network_train_unet_only"))
    tiny = fresh("sdxl")
    unet = copy.deepcopy(tiny.unet)
    lora = load_lora(tmp_path / "out" / "lora.safetensors")
    assert {m.kind for m in lora.modules.values()} == {"loha"} and any(m.is_3x3 for m in lora.modules.values())
    lora.apply_to(unet=unet)
    x, t, ctx, added = unet_inputs()
    with torch.no_grad():
        want = result.unet(x, t, ctx, added_cond_kwargs=added).sample
        got = unet(x, t, ctx, added_cond_kwargs=added).sample
        base = tiny.unet(x, t, ctx, added_cond_kwargs=added).sample
    assert (want - got).abs().max() <= 1e-5 and not torch.equal(want, base)


@pytest.mark.parametrize("case", ["loha_tucker", "lokr_decomposed", "dora"])
def test_each_kind_overfits_a_single_image(assets, tmp_path, case):  # noqa: F811
    """The loss on one fixed batch (fixed noise and timesteps) falls after training on it."""
    image = one_image_dataset(tmp_path)
    extra = [a for a in RUNS[case][0] if a not in ("rank_dropout=0.1", "module_dropout=0.1")]
    dim = extra[extra.index("--network_dim") + 1]
    result = train_recipe.main(args(assets, tmp_path / "out", "--train_data_dir", str(tmp_path / "one"),
                                    "--learning_rate", "1e-2", "--cache_latents", "--network_train_unet_only",
                                    *extra, "--network_alpha", dim, steps=40))
    tiny = fresh("sd1")
    fixed_loss = fixed_batch_loss(tiny, image)
    before, after = fixed_loss(tiny.unet), fixed_loss(result.unet.eval())
    assert after < 0.9 * before, (before, after)


def test_loha_resume_gives_the_same_file(assets, tmp_path):  # noqa: F811
    """A LoHa run's final state, resumed with more steps: bit for bit the file of one longer run."""
    common = ("--save_state", "--train_batch_size", "1", *RUNS["loha_tucker"][0])
    train_recipe.main(args(assets, tmp_path / "a", *common, steps=5))
    train_recipe.main(args(assets, tmp_path / "b", *common, steps=3))
    result = train_recipe.main(args(assets, tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "lora-state"),
                                    steps=5))
    assert result.steps == 5
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    b, _ = kohya_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and any("hada_w1_a" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    # a LoKr run cannot resume a LoHa state
    code = run_main(train_recipe.main, args(assets, tmp_path / "b", "--save_state", "--train_batch_size", "1",
                                            *LYCORIS, "algo=lokr", "--resume", str(tmp_path / "b" / "lora-state"),
                                            steps=6))
    assert code == 2


def random_start(tiny, spec, seed=0):
    """A LoraWeights of `spec`'s kind with random non-zero tensors (on copies of tiny's models)."""
    from lora_sd.lora_weights import LoraWeights
    from lora_sd.targets import lora_configs

    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    configs = lora_configs(unet, te, spec)
    gen = torch.Generator().manual_seed(seed)
    for model, part in ((unet, "unet"), (te, "text_encoder")):
        model.add_adapter(configs[part])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(k in name for k in ("hada_", "lokr_", "lora_")):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1 if "magnitude" in name else 0))
    return LoraWeights.from_peft_models(unet=unet, text_encoder=te)


STARTS = {  # name -> (spec of the file, the network options that fit it, options that do not, the refusal)
    "loha": ({"algo": "loha", "conv_dim": 2},
             ["--network_dim", "4", *LYCORIS, "algo=loha", "conv_dim=2", "rank_dropout=0.2"],
             ["--network_dim", "4", *LYCORIS, "algo=loha", "conv_dim=1"], "has rank 2, but `conv_dim` is 1"),
    "lokr": ({"algo": "lokr", "network_dim": 1, "factor": 4, "decompose_both": True},
             ["--network_dim", "1", *LYCORIS, "algo=lokr", "factor=4", "decompose_both=true"],
             ["--network_dim", "1", *LYCORIS, "algo=lokr"], "is a LoKr of another layout"),
    "dora": ({"dora": True}, ["--network_dim", "4", *LYCORIS, "dora_wd=true"],
             ["--network_dim", "4", *LYCORIS, "algo=loha"], "is a DoRA module, but this network is LoHa"),
}


@pytest.mark.parametrize("kind", list(STARTS))
def test_network_weights_of_each_kind_continues_from_the_file(assets, tmp_path, tiny_sd1, kind, capsys):  # noqa: F811
    """A LoHa/LoKr/DoRA file as the starting point (learning rate 0: the saved network is the file); a file
    that does not fit the configured network (rank, LoKr layout, kind) is one line, exit 2, nothing written."""
    from lora_sd.formats import save_lora
    from lora_sd.targets import NetworkSpec

    spec, fits, misfits, refusal = STARTS[kind]
    start = random_start(tiny_sd1, NetworkSpec(**{"network_dim": 4, "network_alpha": 2, **spec}))
    start_path = tmp_path / "start.safetensors"
    save_lora(start, start_path, "kohya")
    for options in (fits, ["--dim_from_weights", *fits]):
        out = tmp_path / f"out{len(options)}"
        result = train_recipe.main(args(assets, out, "--network_weights", str(start_path), "--learning_rate", "0",
                                        *options))
        if kind == "loha":  # the training options reach the layers made from the file
            layer = dict(result.unet.named_modules())["down_blocks.0.attentions.0.proj_in"]
            assert layer.rank_dropout["default"] == 0.2
        got, want = load_lora(out / "lora.safetensors"), load_lora(start_path)
        assert got.modules.keys() == want.modules.keys()
        for k, m in want.modules.items():
            assert all(torch.equal(t, got.modules[k].named_tensors()[n]) for n, t in m.named_tensors().items()), k
            assert m.dora_scale is None or torch.equal(m.dora_scale, got.modules[k].dora_scale)
    code = run_main(train_recipe.main, args(assets, tmp_path / "bad", "--network_weights", str(start_path), *misfits))
    assert code == 2 and not (tmp_path / "bad").exists() and refusal in capsys.readouterr().err


def test_loha_trains_on_fp8_base_with_checkpointing_and_samples(assets, tmp_path):  # noqa: F811
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks shape --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    result = train_recipe.main(args(assets, out, *RUNS["loha_tucker"][0], "--fp8_base", "--mixed_precision", "bf16",
                                    "--gradient_checkpointing", "--sample_prompts", str(prompts),
                                    "--sample_every_n_steps", "2"))
    layer = dict(result.unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn and layer.hada_t1["default"].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses) and len(result.losses) == 2
    assert [p.name for p in (out / "sample").iterdir()] == ["lora_000002_00.png"]
    assert {m.kind for m in load_lora(out / "lora.safetensors").modules.values()} == {"loha"}
