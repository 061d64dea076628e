"""The three LoRA formats: loaded by diffusers / PEFT with the trained outputs, lossless round trips."""

import copy
import hashlib

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from lora_sd.formats import load_lora, save_lora
from lora_sd.lora_weights import LoraModule, LoraWeights
from tests.helpers import fresh_pipeline, model_outputs, random_adapted

NAMES = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors", "peft": "lora_peft"}


@pytest.fixture
def adapted(tiny):
    """A random LoRA (alpha 2 != rank 4, conv_dim 3 / conv_alpha 1.5) and its in-process outputs."""
    lora, unet, te = random_adapted(tiny, network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5)
    return tiny, lora, model_outputs(tiny, unet, te)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_reproduces_adapted_model(adapted, fmt, tmp_path):
    tiny, lora, (te_ref, unet_ref) = adapted
    te_base, unet_base = model_outputs(tiny)
    assert (te_ref - te_base).abs().max() > 1e-3 and (unet_ref - unet_base).abs().max() > 1e-3
    path = save_lora(lora, tmp_path / NAMES[fmt], fmt)
    pipe = fresh_pipeline(tiny)
    pipe.load_lora_weights(str(path))
    te, unet = model_outputs(tiny, pipe.unet, pipe.text_encoder)
    assert (te - te_ref).abs().max() <= 1e-5
    assert (unet - unet_ref).abs().max() <= 1e-5


def test_peft_loads_adapter_folders(adapted, tmp_path):
    tiny, lora, (te_ref, unet_ref) = adapted
    path = save_lora(lora, tmp_path / NAMES["peft"], "peft")
    unet = PeftModel.from_pretrained(copy.deepcopy(tiny.unet), str(path / "unet"))
    te = PeftModel.from_pretrained(copy.deepcopy(tiny.text_encoder), str(path / "text_encoder"))
    te_out, unet_out = model_outputs(tiny, unet, te)
    assert (te_out - te_ref).abs().max() <= 1e-5
    assert (unet_out - unet_ref).abs().max() <= 1e-5


def test_apply_to_reproduces_adapted_model(adapted, tmp_path):
    tiny, lora, (te_ref, unet_ref) = adapted
    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    load_lora(save_lora(lora, tmp_path / "k.safetensors")).apply_to(unet=unet, text_encoder=te)
    te_out, unet_out = model_outputs(tiny, unet, te)
    assert (te_out - te_ref).abs().max() <= 1e-6 and (unet_out - unet_ref).abs().max() <= 1e-6


def assert_same(a: LoraWeights, b: LoraWeights):
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        assert torch.equal(m.down, b.modules[k].down) and torch.equal(m.up, b.modules[k].up), k
        assert m.alpha == b.modules[k].alpha, k


def test_round_trip_kohya_diffusers_peft_kohya(adapted, tmp_path):
    _, lora, _ = adapted
    k1 = save_lora(lora, tmp_path / "a.safetensors", "kohya")
    d = save_lora(load_lora(k1), tmp_path / "b.safetensors", "diffusers")
    p = save_lora(load_lora(d), tmp_path / "c_peft", "peft")
    k2 = save_lora(load_lora(p), tmp_path / "d.safetensors", "kohya")
    assert_same(lora, load_lora(k2))
    t1, t2 = safetensors.torch.load_file(k1), safetensors.torch.load_file(k2)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_kohya_file_layout_and_metadata(tiny_sd1, tmp_path):
    lora, _, _ = random_adapted(tiny_sd1, network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1.5)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{name}.alpha"].dim() == 0 and tensors[f"{name}.alpha"].item() == 2
    conv = "lora_unet_down_blocks_0_downsamplers_0_conv"
    assert tensors[f"{conv}.lora_down.weight"].shape == (3, 8, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (8, 3, 1, 1)
    assert tensors[f"{conv}.alpha"].item() == 1.5
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 8, 1, 1)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert '"conv_dim": "3"' in meta["ss_network_args"] and '"conv_alpha": "1.5"' in meta["ss_network_args"]
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    # sshs_model_hash: sha256 of the bytes after the header (the tensor data does not depend on it)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_legacy_hash_of_a_file_over_1_MiB(tmp_path):
    """sshs_legacy_hash (FORMATS.md): the first 8 hex of sha256 of bytes [0x100000, 0x110000) of the file as
    serialized with only the ss_* metadata. The file must pass 0x110000 bytes, or both sides hash nothing."""
    gen = torch.Generator().manual_seed(0)
    big = LoraModule(torch.randn(64, 2304, generator=gen), torch.randn(2304, 64, generator=gen), alpha=8.0)
    lora = LoraWeights({"unet.down_blocks.0.attentions.0.proj_in": big}, {"ss_training_comment": "big"})
    path = save_lora(lora, tmp_path / "big.safetensors")
    assert path.stat().st_size > 0x110000
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ss_only = safetensors.torch.save(safetensors.torch.load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    window = ss_only[0x100000:0x110000]
    assert len(window) == 0x10000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(window).hexdigest()[:8]


def test_files_from_other_tools(tiny_sd2, tmp_path):
    """No .alpha (alpha = rank), fp16/bf16 tensors, int64 alpha, 4-D proj_in on SD2's Linear."""
    lora, unet_ref, te_ref = random_adapted(tiny_sd2, network_dim=4, network_alpha=4, train_text_encoder=False)
    ref = model_outputs(tiny_sd2, unet_ref, tiny_sd2.text_encoder)[1]
    path = save_lora(lora, tmp_path / "x.safetensors")
    tensors = safetensors.torch.load_file(path)
    other = {}
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            if "proj_out" in k:
                other[k] = torch.tensor(2)  # int64, as sd-scripts' svd_merge writes; 2 != rank 4 (the fallback)
            continue  # other files: no alpha -> alpha = rank (4 here)
        if "proj_in" in k:
            v = v[:, :, None, None]  # sd-scripts trained from a single file: 1x1 conv shapes
        if "proj_out" in k and "lora_up" in k:
            v = v * 2  # the same delta at alpha 2 (scale 2/4) as the reference's alpha 4
        other[k] = v.to(torch.bfloat16 if "up" in k else torch.float16)
    safetensors.torch.save_file(other, tmp_path / "other.safetensors")
    back = load_lora(tmp_path / "other.safetensors")
    assert {k: m.alpha for k, m in back.modules.items() if m.alpha != 4} == {
        k: 2 for k in back.modules if k.endswith("proj_out")} != {}
    unet = copy.deepcopy(tiny_sd2.unet)
    back.apply_to(unet=unet)
    out = model_outputs(tiny_sd2, unet, tiny_sd2.text_encoder)[1]
    assert (out - ref).abs().max() < 5e-3  # half-precision tensors


def test_ckpt_files_read_with_weights_only(tiny_sd1, tmp_path):
    lora, _, _ = random_adapted(tiny_sd1)
    path = save_lora(lora, tmp_path / "x.ckpt")
    assert_same(lora, load_lora(path))


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision(tiny_sd1, tmp_path, precision, dtype):
    lora, _, _ = random_adapted(tiny_sd1)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya", precision)
    assert {t.dtype for t in safetensors.torch.load_file(path).values()} == {dtype}


def test_conv_delta_shapes():
    m = LoraModule(torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1), alpha=1.0)
    d = m.delta()
    assert d.shape == (5, 3, 3, 3)
    ref = torch.einsum("or,rikl->oikl", m.up[:, :, 0, 0], m.down) * 0.5
    assert torch.allclose(d, ref, atol=1e-6)


def test_sdxl_text_encoder_names_readable(tiny_sd1, tmp_path):
    lora, _, _ = random_adapted(tiny_sd1)
    tensors = safetensors.torch.load_file(save_lora(lora, tmp_path / "x.safetensors"))
    # text encoders only: an SDXL file's U-Net names are the original layout's (tests/test_sdxl_formats.py)
    xl = {k.replace("lora_te_", "lora_te1_"): v for k, v in tensors.items() if k.startswith("lora_te_")}
    xl["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    xl["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 4)
    safetensors.torch.save_file(xl, tmp_path / "xl.safetensors")
    back = load_lora(tmp_path / "xl.safetensors")
    assert set(back.component("text_encoder")) == set(lora.component("text_encoder"))
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"  # noted from the names
    assert set(back.component("text_encoder_2")) == {"text_model.encoder.layers.0.mlp.fc1"}

    written = safetensors.torch.load_file(save_lora(back, tmp_path / "xl2.safetensors"))  # SDXL names kept
    assert set(written) == {k for k in xl} | {k.replace(".lora_down.weight", ".alpha") for k in xl if "lora_te2_" in k}


@pytest.mark.parametrize("fmt,existing", [("peft", "folder"), ("peft", "file"), ("kohya", "folder"), ("diffusers", "folder")])
def test_save_refuses_to_replace_what_is_not_a_lora(tiny_sd1, tmp_path, fmt, existing):
    """A PEFT folder replaces an existing PEFT folder only: another folder (or file) there is left alone."""
    from lora_sd.errors import FormatError

    lora, _, _ = random_adapted(tiny_sd1)
    target = tmp_path / "out"
    if existing == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    with pytest.raises(FormatError, match=f"^{target}: "):
        save_lora(lora, target, fmt)
    assert (target / "notes.txt" if existing == "folder" else target).read_text() == "mine"
    save_lora(lora, tmp_path / "p", "peft")
    save_lora(lora, tmp_path / "p", "peft")  # an adapter folder is replaced
    assert_same(lora, load_lora(tmp_path / "p"))


def test_unreadable_diffusers_adapter_metadata_is_one_line(tiny_sd1, tmp_path):
    from lora_sd.errors import FormatError

    lora, _, _ = random_adapted(tiny_sd1)
    path = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata={"lora_adapter_metadata": "{oops"})
    with pytest.raises(FormatError, match="d.safetensors: unreadable lora_adapter_metadata"):
        load_lora(path)


def test_mismatched_up_and_down_are_refused_on_reading(tiny_sd1, tmp_path):
    """A pair whose ranks differ would merge into a silently broken file or die in a matmul later."""
    from lora_sd.errors import FormatError

    lora, _, _ = random_adapted(tiny_sd1)
    path = save_lora(lora, tmp_path / "x.safetensors")
    tensors = safetensors.torch.load_file(path)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :3].contiguous()
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(FormatError, match=r"x.safetensors: module text_encoder.*q_proj has down \(4, 32\), up \(32, 3\)"):
        load_lora(path)
