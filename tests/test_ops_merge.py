"""recipes/merge_lora.py and lora_sd.ops.merge: into a model (single file and folder), LoRA + LoRA.

References are diffusers' own adapter weighting (`set_adapters`) on the tiny models,
not our arithmetic. LoRAs have conv_dim set and alpha != rank; one is U-Net only.
"""

import pytest
import safetensors.torch
import torch

from lora_sd.cli import run_main
from lora_sd.errors import ConfigError
from lora_sd.formats import load_lora, save_lora
from lora_sd.lora_weights import LoraModule, LoraWeights
from lora_sd.models import load_base
from lora_sd.ops import merge_loras
from lora_sd.tiny import save_tiny_diffusers, save_tiny_single_file
from recipes.merge_lora import main
from tests.helpers import max_diff, model_outputs, outputs_with_loras, random_lora

RATIOS = [0.8, -0.5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    """Per version: LoRA files a (U-Net+TE, dim 4/alpha 2, conv 3/alpha 1), b (U-Net only, dim 8/alpha 1,
    conv 2/alpha 5), c (like a, other seed), the LoRAs, models on disk and reference outputs."""
    cache = {}

    def get(version):
        if version in cache:
            return cache[version]
        tiny = request.getfixturevalue(f"tiny_{version}")
        d = tmp_path_factory.mktemp(f"merge_{version}")
        loras = {
            "a": random_lora(tiny, 4, 2, conv_dim=3, conv_alpha=1, seed=1, scale=0.3),
            "b": random_lora(tiny, 8, 1, conv_dim=2, conv_alpha=5, seed=2, scale=0.3, train_text_encoder=False),
            "c": random_lora(tiny, 4, 2, conv_dim=3, conv_alpha=1, seed=3, scale=0.3),
        }
        files = {}
        for name, lora in loras.items():
            files[name] = d / f"{name}.safetensors"
            save_lora(lora, files[name], version=version)
        single, config = save_tiny_single_file(d / "model.safetensors", version)
        # an extra key the converter does not know: it must survive the merge
        sd = safetensors.torch.load_file(str(single))
        sd["model_ema.decay"] = torch.tensor(0.9999)
        safetensors.torch.save_file(sd, str(single))
        folder = save_tiny_diffusers(d / "model_dir", version)
        ref = outputs_with_loras(tiny, [loras["a"], loras["b"]], RATIOS)
        cache[version] = dict(tiny=tiny, dir=d, loras=loras, files=files, single=single, config=config,
                              folder=folder, ref=ref)
        return cache[version]

    return get


def _run(argv, capsys):
    rc = run_main(main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("version", ["sd1", "sd2"])
@pytest.mark.parametrize("kind", ["single_file", "folder"])
def test_merge_into_model_equals_adapters(setup, version, kind, tmp_path):
    s = setup(version)
    src, out = (s["single"], tmp_path / "merged.safetensors") if kind == "single_file" else (s["folder"], tmp_path / "merged")
    argv = ["--sd_model", src, "--save_to", out, "--models", s["files"]["a"], s["files"]["b"], "--ratios", *RATIOS]
    if kind == "single_file":
        argv += ["--model_config", s["config"]]
    if version == "sd2":
        argv += ["--v2"]
    main([str(a) for a in argv])
    merged = load_base(out, model_config=s["config"] if kind == "single_file" else None)
    got = model_outputs(merged)
    assert max_diff(got, s["ref"]) <= 1e-4
    assert max_diff(got, model_outputs(s["tiny"])) > 1e-3  # the LoRAs did change the outputs
    if kind == "single_file":
        keys = safetensors.torch.load_file(str(out))
        assert "model_ema.decay" in keys


def test_merge_into_model_save_precision(setup, tmp_path):
    s = setup("sd1")
    out = tmp_path / "m.safetensors"
    main([str(a) for a in ["--sd_model", s["single"], "--model_config", s["config"], "--save_to", out,
                           "--models", s["files"]["a"], "--ratios", "1", "--save_precision", "fp16"]])
    sd = safetensors.torch.load_file(str(out))
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_exact_lora_merge_equals_both_loras(setup, version, tmp_path):
    s = setup(version)
    out = tmp_path / "ab.safetensors"
    main([str(a) for a in ["--save_to", out, "--models", s["files"]["a"], s["files"]["b"], "--ratios", *RATIOS]])
    merged = load_lora(out)
    a, b = s["loras"]["a"], s["loras"]["b"]
    for key, m in merged.modules.items():
        want = RATIOS[0] * a.modules[key].delta() if key in a.modules else 0
        want = want + (RATIOS[1] * b.modules[key].delta() if key in b.modules else 0)
        assert torch.allclose(m.delta(), want, atol=1e-6), key
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    assert max_diff(outputs_with_loras(s["tiny"], [merged], [1.0]), s["ref"]) <= 1e-4
    assert merged.metadata["ss_base_model_version"] == ("sd_v2" if version == "sd2" else "sd_v1")


def test_kohya_mode_is_sd_scripts_formula(setup, tmp_path):
    s = setup("sd1")
    out = tmp_path / "ac.safetensors"
    main([str(a) for a in ["--save_to", out, "--models", s["files"]["a"], s["files"]["c"], "--ratios", *RATIOS,
                           "--concat", "false"]])
    merged = load_lora(out)
    a, c = s["loras"]["a"], s["loras"]["c"]
    r1, r2 = RATIOS
    for key, m in merged.modules.items():
        ma, mc = a.modules[key], c.modules[key]
        assert m.alpha == ma.alpha and m.rank == ma.rank
        assert torch.allclose(m.up, abs(r1) * ma.up + abs(r2) * mc.up, atol=1e-6)
        assert torch.allclose(m.down, r1 * ma.down + r2 * mc.down, atol=1e-6)


def test_different_ranks_exact_merges_kohya_mode_refuses():
    m1 = LoraModule(torch.randn(2, 3), torch.randn(4, 2), 2.0)
    m2 = LoraModule(torch.randn(4, 3), torch.randn(4, 4), 2.0)
    with pytest.raises(ConfigError, match="svd_merge_lora"):
        merge_loras([LoraWeights({"unet.x": m1}), LoraWeights({"unet.x": m2})], [1.0, 1.0], mode="kohya")
    exact = merge_loras([LoraWeights({"unet.x": m1}), LoraWeights({"unet.x": m2})], [1.0, 0.5])
    assert torch.allclose(exact.modules["unet.x"].delta(), m1.delta() + 0.5 * m2.delta(), atol=1e-6)


def test_kohya_mode_refuses_different_ranks(setup, tmp_path, capsys):
    s = setup("sd1")
    out = tmp_path / "ab.safetensors"
    rc, err = _run(["--save_to", out, "--models", s["files"]["a"], s["files"]["b"], "--concat", "false"], capsys)
    assert rc == 2 and "svd_merge_lora" in err and err.count("\n") == 1
    assert not out.exists()


def test_sd1_and_sd2_loras_are_refused(setup, tmp_path, capsys):
    s1, s2 = setup("sd1"), setup("sd2")
    out = tmp_path / "mixed.safetensors"
    rc, err = _run(["--save_to", out, "--models", s1["files"]["a"], s2["files"]["a"]], capsys)
    assert rc == 2 and "SD 1.x" in err and "SD 2.x" in err
    rc, err = _run(["--sd_model", s1["single"], "--model_config", s1["config"], "--save_to", out,
                    "--models", s2["files"]["a"]], capsys)
    assert rc == 2 and "SD 2.x" in err
    assert not out.exists()


@pytest.mark.parametrize("ratios, message", [(["0.5"], "--ratios: 1 value(s) for 2"), (["0.5", "x"], "'x' is not a number")])
def test_bad_ratios(setup, tmp_path, capsys, ratios, message):
    s = setup("sd1")
    out = tmp_path / "o.safetensors"
    rc, err = _run(["--save_to", out, "--models", s["files"]["a"], s["files"]["b"], "--ratios", *ratios], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_lora_that_does_not_fit_names_the_module(setup, tmp_path, capsys):
    s = setup("sd1")
    bad = s["loras"]["a"].to(torch.float32)
    key = next(k for k in bad.modules if k.endswith("to_k"))
    m = bad.modules[key]
    bad.modules[key] = LoraModule(torch.randn(m.rank, m.down.shape[1] + 3), m.up, m.alpha)
    save_lora(bad, tmp_path / "bad.safetensors", version="sd1")
    out = tmp_path / "o.safetensors"
    rc, err = _run(["--sd_model", s["single"], "--model_config", s["config"], "--save_to", out,
                    "--models", s["files"]["b"], tmp_path / "bad.safetensors"], capsys)
    assert rc == 2 and key in err and "bad.safetensors" in err and err.count("\n") == 1
    assert not out.exists()


def test_merge_folder_model_into_ckpt_file(setup, tmp_path):
    s = setup("sd1")
    out = tmp_path / "merged.ckpt"
    main([str(a) for a in ["--sd_model", s["folder"], "--save_to", out, "--models", s["files"]["a"],
                           s["files"]["b"], "--ratios", *RATIOS]])
    merged = load_base(out, model_config=s["config"])
    assert max_diff(model_outputs(merged), s["ref"]) <= 1e-4


def test_up_and_down_of_different_ranks_are_refused_before_any_change(tiny_sd1):
    import copy

    from lora_sd.errors import ModelMismatchError
    from lora_sd.ops import merge_into_models

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = LoraWeights({key: LoraModule(torch.randn(4, 8), torch.randn(8, 3), 4.0)})  # up has rank 3
    unet = copy.deepcopy(tiny_sd1.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ModelMismatchError, match=r"x.safetensors: LoRA module .*attn1.to_q does not fit.*up \(8, 3\)"):
        merge_into_models([lora], [1.0], {"unet": unet}, names=["x.safetensors"])
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ModelMismatchError, match=r"attn1.to_q does not fit.*the layer needs down \(4, 8\), up \(8, 4\)"):
        lora.apply_to(unet=unet)


def test_2d_factors_merge_into_1x1_conv_and_4d_into_linear(tiny_sd1, tiny_sd2):
    """SD2 files have proj_in/proj_out as 2-D or 4-D whatever the model's layer is."""
    import copy

    from lora_sd.ops import merge_into_models

    for tiny, as_4d in ((tiny_sd1, False), (tiny_sd2, True)):
        unet = copy.deepcopy(tiny.unet)
        layer = unet.down_blocks[0].attentions[0].proj_in
        out_dim, in_dim = layer.weight.shape[:2]
        down, up = torch.randn(2, in_dim), torch.randn(out_dim, 2)
        if as_4d:
            down, up = down[:, :, None, None], up[:, :, None, None]
        lora = LoraWeights({"unet.down_blocks.0.attentions.0.proj_in": LoraModule(down, up, 1.0)})
        before = layer.weight.detach().clone()
        assert merge_into_models([lora], [0.5], {"unet": unet}) == 1
        want = before + 0.5 * (up.flatten(1) @ down.flatten(1) / 2).reshape(before.shape)
        assert torch.allclose(layer.weight, want, atol=1e-6)


@pytest.mark.parametrize("name", ["merged", "merged.safetensors"])
def test_save_to_an_existing_folder_that_is_not_a_model_is_refused(setup, tmp_path, capsys, name):
    s = setup("sd1")
    out = tmp_path / name
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = _run(["--sd_model", s["folder"], "--save_to", out, "--models", s["files"]["a"]], capsys)
    assert rc == 2 and f"--save_to {out}: " in err and "folder" in err and err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine"


def _weights(model, lora):
    """{LoRA module key: the model's weight for it}."""
    from lora_sd.lora_weights import model_module_name

    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    named = {c: dict(m.named_modules()) for c, m in parts.items()}
    out = {}
    for key in lora.modules:
        component, path = key.split(".", 1)
        out[key] = named[component][model_module_name(component, path, parts[component])].weight.detach()
    return out


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_merge_into_model_is_computed_in_precision(setup, tmp_path, precision, dtype):
    """W' = (W + r * delta), both in --precision, then stored at --save_precision (float here)."""
    s = setup("sd1")
    lora, ratio = s["loras"]["a"], 0.8
    base = _weights(s["tiny"], lora)
    merged = {}
    for p in ("float", precision):
        out = tmp_path / p
        main([str(a) for a in ["--sd_model", s["folder"], "--save_to", out, "--models", s["files"]["a"],
                               "--ratios", ratio, "--precision", p, "--save_precision", "float"]])
        merged[p] = _weights(load_base(out), lora)
    changed = 0
    for key, m in lora.modules.items():
        w = base[key]
        want = (w.to(dtype) + ratio * m.delta(dtype).reshape(w.shape)).float()
        assert torch.equal(merged[precision][key], want), key
        changed += not torch.equal(merged[precision][key], merged["float"][key])
    assert changed == len(lora.modules)  # the precision makes a difference everywhere


@pytest.mark.parametrize("save_precision, dtype", [(None, torch.float16), ("bf16", torch.bfloat16),
                                                   ("float", torch.float32)])
def test_saved_dtype_follows_save_precision(setup, tmp_path, save_precision, dtype):
    """--save_precision, or --precision when it is not given, for a merged model and a merged LoRA."""
    s = setup("sd1")
    extra = ["--precision", "fp16"] + (["--save_precision", save_precision] if save_precision else [])
    model_out, lora_out = tmp_path / "m.safetensors", tmp_path / "l.safetensors"
    main([str(a) for a in ["--sd_model", s["single"], "--model_config", s["config"], "--save_to", model_out,
                           "--models", s["files"]["a"], *extra]])
    main([str(a) for a in ["--save_to", lora_out, "--models", s["files"]["a"], s["files"]["b"], *extra]])
    for out in (model_out, lora_out):
        dtypes = {t.dtype for t in safetensors.torch.load_file(str(out)).values() if t.is_floating_point()}
        assert dtypes == {dtype}, out


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_lora_merge_is_computed_in_precision(setup, tmp_path, precision, dtype):
    """Each up is scaled by ratio * alpha / rank in --precision (sd-scripts' merge_dtype)."""
    s = setup("sd1")
    out = tmp_path / "ab.safetensors"
    main([str(a) for a in ["--save_to", out, "--models", s["files"]["a"], s["files"]["b"], "--ratios", *RATIOS,
                           "--precision", precision, "--save_precision", "float"]])
    merged = load_lora(out)
    a, b = s["loras"]["a"], s["loras"]["b"]
    rounded = 0
    for key, m in merged.modules.items():
        parts = [(r, x.modules[key]) for r, x in zip(RATIOS, (a, b), strict=True) if key in x.modules]
        up = torch.cat([x.up.to(dtype).flatten(1) * (r * x.scale) for r, x in parts], dim=1).float()
        down = torch.cat([x.down.to(dtype).flatten(1) for _, x in parts]).float()
        assert torch.equal(m.down.flatten(1), down), key
        if m.alpha == m.rank:
            assert torch.equal(m.up.flatten(1), up), key
        else:  # one alpha per file: this module's scale (its total rank / the file's alpha) is in its up weights
            want = (up.to(dtype) * (m.rank / m.alpha)).float()  # the scaling is one more step in --precision
            assert torch.allclose(m.up.flatten(1), want, rtol=torch.finfo(dtype).eps, atol=0), key
        exact = torch.cat([x.up.flatten(1) * (r * x.scale) for r, x in parts], dim=1)
        rounded += not torch.equal(up, exact)
    assert rounded == len(merged.modules)


def test_lists_paired_by_position_must_have_one_value_each():
    """merge_loras([a, b], [1.0]) used to drop b: every pairing of LoRAs and values is checked."""
    from lora_sd.generate import add_networks
    from lora_sd.ops import merge_into_models, svd_merge

    m = LoraModule(torch.randn(2, 3), torch.randn(4, 2), 2.0)
    a, b = LoraWeights({"unet.x": m}), LoraWeights({"unet.y": m})
    calls = {
        "merge_loras": lambda: merge_loras([a, b], [1.0]),
        "merge_loras kohya": lambda: merge_loras([a, b], [1.0, 1.0, 1.0], mode="kohya"),
        "merge_loras names": lambda: merge_loras([a, b], [1.0, 1.0], names=["a"]),
        "svd_merge": lambda: svd_merge([a, b], [1.0], new_rank=2),
        "merge_into_models": lambda: merge_into_models([a, b], [0.5], {}),
        "generate's add_networks": lambda: add_networks(None, [a, b], [0.5]),
    }
    for what, call in calls.items():
        with pytest.raises(ConfigError, match=r"\d value\(s\) for 2 LoRA\(s\)"):
            call()


def test_ops_write_one_alpha_with_every_delta_kept(setup):
    """diffusers (0.42) gives misnamed attention alphas the file's most common one: the exact merge of LoRAs whose
    modules have different total ranks (the text encoder in one LoRA only) writes one alpha, deltas unchanged."""
    s = setup("sd1")
    a, b = s["loras"]["a"], s["loras"]["b"]
    merged = merge_loras([a, b], [1.0, 0.5])
    assert len({m.alpha for m in merged.modules.values()}) == 1
    ranks = {m.rank for m in merged.modules.values()}
    assert len(ranks) > 1  # without one alpha, alpha = each module's total rank would differ
    for key, m in merged.modules.items():
        want = sum(r * x.modules[key].delta() for r, x in ((1.0, a), (0.5, b)) if key in x.modules)
        assert torch.allclose(m.delta(), want, atol=1e-6), key
