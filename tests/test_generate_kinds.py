"""LoRAs of every kind on a pipeline: several at once as PEFT adapters at their own weights, or merged; the
public `lora_sd.load_loras_into_pipeline`; recipes/generate.py with LoHa and LoKr files."""

import copy
import importlib.util

import numpy as np
import pytest

import lora_sd
from lora_sd.errors import FormatError, ModelMismatchError
from lora_sd.formats.peft import write_peft_folder
from lora_sd.generate import add_networks
from lora_sd.lora_weights import LoraWeights
from tests.helpers import fresh_pipeline, model_outputs
from tests.test_peft_kinds import build, merged_copy

# Parts of issue 11 that other branches bring: LyCORIS names in kohya files (formats/checks.py arrives with
# them) and merge/load_loras for every kind (ops/gather.py). Tests that need them run once those are merged.
FILES_LANDED = importlib.util.find_spec("lora_sd.formats.checks") is not None
OPS_LANDED = importlib.util.find_spec("lora_sd.ops.gather") is not None


def reference(tiny, loras, weights):
    """model_outputs of copies of tiny's models with every LoRA merged by the formulas at its weight."""
    pairs = list(zip(loras, weights, strict=True))
    return model_outputs(tiny, merged_copy(tiny.unet, "unet", pairs), merged_copy(tiny.text_encoder, "text_encoder", pairs))


def assert_close(got, ref, tol=1e-5):
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() <= tol


def test_several_kinds_as_adapters_at_their_own_weights(tiny_sd1):
    """A LoHa, a LoRA (given after it: PEFT needs LoRA layers innermost) and a LoKr at 0.7 / 0.3 / -0.5 on the
    same modules of the U-Net and text encoder: W + sum_i w_i dW_i."""
    loras = [build("loha_tucker", tiny_sd1.unet, tiny_sd1.text_encoder, seed=1),
             build("lora", tiny_sd1.unet, tiny_sd1.text_encoder, seed=2),
             build("lokr_odd", tiny_sd1.unet, tiny_sd1.text_encoder, seed=3)]
    pipe = fresh_pipeline(tiny_sd1)
    names = add_networks(pipe, loras, [0.7, 0.3, -0.5])
    assert names == ["lora0", "lora1", "lora2"]
    assert_close(model_outputs(tiny_sd1, pipe.unet, pipe.text_encoder), reference(tiny_sd1, loras, [0.7, 0.3, -0.5]))
    for name, lora in zip(names, loras, strict=True):  # each adapter holds its own file
        back = LoraWeights.from_peft_models(name, unet=pipe.unet, text_encoder=pipe.text_encoder)
        assert back.modules.keys() == lora.modules.keys()


def test_dora_adapter_beside_a_lokr(tiny_sd1):
    """DoRA at weight 1 (PEFT's DoRA; at other weights PEFT scales the LoRA part inside DoRA) beside a LoKr."""
    loras = [build("lokr_decomposed", tiny_sd1.unet, seed=4), build("dora", tiny_sd1.unet, seed=5)]
    pipe = fresh_pipeline(tiny_sd1)
    add_networks(pipe, loras, [1.0, 1.0])
    _, got = model_outputs(tiny_sd1, pipe.unet)
    _, ref = model_outputs(tiny_sd1, merged_copy(tiny_sd1.unet, "unet", [(loras[1], 1.0), (loras[0], 1.0)]))
    assert (got - ref).abs().max() <= 1e-5


def test_merged_kinds_equal_the_formulas(tiny_sd1):
    loras = [build("loha", tiny_sd1.unet, tiny_sd1.text_encoder, seed=6),
             build("lokr_full", tiny_sd1.unet, tiny_sd1.text_encoder, seed=7)]
    pipe = fresh_pipeline(tiny_sd1)
    assert add_networks(pipe, loras, [0.7, 0.3], merge=True) == []
    assert_close(model_outputs(tiny_sd1, pipe.unet, pipe.text_encoder), reference(tiny_sd1, loras, [0.7, 0.3]))


@pytest.mark.skipif(not OPS_LANDED, reason="DoRA in merge_into_models arrives with the ops branch of issue 11")
def test_merged_dora_is_comfyui_strength_rule(tiny_sd1):
    lora = build("dora", tiny_sd1.unet, seed=8)
    pipe = fresh_pipeline(tiny_sd1)
    add_networks(pipe, [lora], [0.6], merge=True)
    _, got = model_outputs(tiny_sd1, pipe.unet)
    _, ref = model_outputs(tiny_sd1, merged_copy(tiny_sd1.unet, "unet", [(lora, 0.6)]))
    assert (got - ref).abs().max() <= 1e-5


def test_nothing_changes_when_one_file_does_not_fit(tiny_sd1):
    """The second file (a LoHa, applied after the LoRA) has a module that does not fit: refused naming the file
    and the module, before the first file is applied."""
    good, bad = build("lora", tiny_sd1.unet, seed=9), build("loha", tiny_sd1.unet, seed=10)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = bad.modules[key].tensors
    t["hada_w1_b"], t["hada_w2_b"] = t["hada_w1_b"][:, :4], t["hada_w2_b"][:, :4]
    pipe = fresh_pipeline(tiny_sd1)
    with pytest.raises(ModelMismatchError, match=rf"^bad\.safetensors: LoHa module {key} does not fit the model"):
        add_networks(pipe, [good, bad], [1, 1], names=["good.safetensors", "bad.safetensors"])
    assert not getattr(pipe.unet, "peft_config", None)


def test_what_peft_cannot_hold_is_refused_pointing_to_merging(tiny_sd1):
    bad = build("lora", tiny_sd1.unet, seed=11)
    key, m = next(iter(bad.modules.items()))
    m.dora_scale = m.down.new_ones(1, m.down.shape[1])  # DoRA per input column
    with pytest.raises(FormatError, match=rf"^bad\.safetensors: module {key}.*per input column.*--network_merge"):
        add_networks(fresh_pipeline(tiny_sd1), [bad], [1], names=["bad.safetensors"])


def _folders(tiny, tmp_path, kinds):
    paths = []
    for i, kind in enumerate(kinds):
        lora = build(kind, tiny.unet, tiny.text_encoder, seed=20 + i)
        write_peft_folder(lora, tmp_path / kind)
        paths.append(tmp_path / kind)
    return paths, [build(k, tiny.unet, tiny.text_encoder, seed=20 + i) for i, k in enumerate(kinds)]


@pytest.mark.parametrize("kinds", [
    ("lora", "dora"),
    pytest.param(("loha", "lokr_decomposed"), marks=pytest.mark.skipif(
        not OPS_LANDED, reason="load_loras reads LoHa/LoKr once the ops branch of issue 11 is merged")),
])
def test_public_function_loads_files_into_a_pipeline(tiny_sd1, tmp_path, kinds):
    paths, loras = _folders(tiny_sd1, tmp_path, kinds)
    pipe = fresh_pipeline(tiny_sd1)
    weights = [1.0, 1.0] if "dora" in kinds else [0.7, 0.3]
    names = lora_sd.load_loras_into_pipeline(pipe, [str(p) for p in paths], weights)
    ref = reference(tiny_sd1, loras[::-1], weights[::-1])  # a DoRA file acts first, on the base weight
    assert_close(model_outputs(tiny_sd1, pipe.unet, pipe.text_encoder), ref)
    again = lora_sd.load_loras_into_pipeline(pipe, paths[0])  # a second call adds adapters under new names
    assert set(again).isdisjoint(names)
    if "dora" in kinds and not OPS_LANDED:
        return  # DoRA in merge_into_models arrives with the ops branch of issue 11
    merged = fresh_pipeline(tiny_sd1)
    assert lora_sd.load_loras_into_pipeline(merged, paths, weights, merge=True) == []
    assert_close(model_outputs(tiny_sd1, merged.unet, merged.text_encoder), ref)


@pytest.mark.skipif(not (FILES_LANDED and OPS_LANDED),
                    reason="kohya files with LyCORIS names arrive with the files and ops branches of issue 11")
def test_generate_recipe_with_loha_and_lokr_files(tiny_sd1, tmp_path):
    from lora_sd.formats import save_lora
    from lora_sd.tiny import save_tiny_diffusers
    from recipes.generate import main

    model = save_tiny_diffusers(tmp_path / "model", "sd1")
    files = []
    for kind, seed in (("loha_tucker", 30), ("lokr_decomposed", 31)):
        lora = build(kind, tiny_sd1.unet, copy.deepcopy(tiny_sd1.text_encoder), seed=seed)
        files.append(save_lora(lora, tmp_path / f"{kind}.safetensors", version="sd1"))
    args = ["--ckpt", model, "--prompt", "a photo of a cat", "--W", "32", "--H", "32", "--steps", "3", "--seed", "7",
            "--device", "cpu", "--network_module", "lycoris.kohya", "--network_weights", *files,
            "--network_mul", "0.7", "0.3"]
    images = {}
    for mode, extra in (("base", ["--network_mul", "0", "0"]), ("adapters", []), ("merged", ["--network_merge"])):
        main([str(a) for a in [*args, "--outdir", tmp_path / mode, *extra]])
        from PIL import Image

        images[mode] = np.asarray(Image.open(next((tmp_path / mode).glob("*.png"))).convert("RGB"), dtype=np.int16)
    assert np.abs(images["adapters"] - images["merged"]).max() <= 2
    assert np.abs(images["adapters"] - images["base"]).max() > 2
