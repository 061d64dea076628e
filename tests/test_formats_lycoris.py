"""LyCORIS files (LoHa, LoKr, LoCon, DoRA) as LyCORIS' trainers write them: read, merged and written back.

The files are built here with LyCORIS' tensor names and shapes (lycoris/modules/loha.py, lokr.py,
locon.py: flattened 3x3 convs, Tucker cores, LoKr with full and decomposed factors, files without
alpha, DoRA on either axis). Each module's merged weight is compared with the formula written out
below from the published definitions (ComfyUI comfy/weight_adapter/{loha,lokr,lora}.py and base.py
weight_decompose; LyCORIS' modules), not with lora_sd.adapter_math.
"""

import json

import pytest
import safetensors.torch
import torch

from lora_sd.errors import FormatError
from lora_sd.formats import read_lora, save_lora
from lora_sd.formats.convert import convert_lora_file
from lora_sd.formats.names import kohya_name

STRENGTH = 0.7
FF = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # Linear (64, 8)
CONV = "unet.down_blocks.0.resnets.0.conv1"  # Conv2d (8, 8, 3, 3)
K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear (16, 32)
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # Linear (32, 32)
PROJ = "unet.down_blocks.0.attentions.0.proj_in"  # 1x1 Conv2d (8, 8, 1, 1)


def rnd(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


def weight_of(tiny, key):
    component, path = key.split(".", 1)
    model = getattr(tiny, component)
    if component == "text_encoder" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return dict(model.named_modules())[path].weight.detach().clone()


# --- the published formulas (per module: W -> W + strength * change) ------------------------------

def row_norm(w):
    return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))


def col_norm(w):
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def dora(w, dw, m):
    """DoRA: m * (W + dW) / ||W + dW||, per output row for m [out, 1...] (LyCORIS wd_on_output, PEFT), per input
    column for m [1, in...] (LyCORIS' first convention, A1111, ComfyUI); a strength s applies W + s (W' - W)."""
    wc = w + dw
    return wc * (m / (row_norm(wc) if m.shape[0] == w.shape[0] else col_norm(wc)))


def tucker(t, wa, wb):  # LyCORIS / ComfyUI: einsum('i j k l, j r, i p -> p r k l', t, wb, wa)
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def loha_delta(p, alpha, shape):
    """ComfyUI loha.py: (w1a @ w1b) * (w2a @ w2b) * alpha / rank (rank = w1b's rows), or Tucker-rebuilt factors."""
    if "hada_t1" in p:
        w1 = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        w2 = tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        rank = p["hada_t1"].shape[0]
    else:
        w1, w2, rank = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"], p["hada_w1_b"].shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return (w1 * w2 * scale).reshape(shape)


def lokr_delta(p, alpha, shape):
    """ComfyUI lokr.py: kron(w1, w2), w1 unsqueezed for a 4-D w2, times alpha / dim, dim the rank of the
    decomposed factor (w2's when both are), and times 1 when neither factor is decomposed or alpha is missing."""
    dim = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        w1, dim = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
    w2 = p.get("lokr_w2")
    if w2 is None:
        dim = p["lokr_w2_b"].shape[0]
        w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]) if "lokr_t2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(shape)  # A1111 make_kron: w2.contiguous()


def lora_delta(p, alpha, shape):
    """ComfyUI lora.py: up @ down * alpha / rank; with lora_mid, tucker_weight_from_conv(up, down, mid)."""
    up, down = p["lora_up.weight"].flatten(1), p["lora_down.weight"].flatten(1)
    rank = down.shape[0]
    if "lora_mid.weight" in p:
        d = torch.einsum("mnkl,im,nj->ijkl", p["lora_mid.weight"], up, down)
    else:
        d = up @ down
    return d.reshape(shape) * (1.0 if alpha is None else alpha / rank)


def expected(w, p):
    p = dict(p)
    alpha = p.pop("alpha", None)
    alpha = None if alpha is None else alpha.item()
    m = p.pop("dora_scale", None)
    kind = "loha" if "hada_w1_a" in p else "lokr" if any(k.startswith("lokr") for k in p) else "lora"
    dw = {"loha": loha_delta, "lokr": lokr_delta, "lora": lora_delta}[kind](p, alpha, w.shape)
    changed = w + dw if m is None else dora(w, dw, m)
    return w + STRENGTH * (changed - w)


# --- files as LyCORIS writes them ------------------------------------------------------------------

def a(x):
    return torch.tensor(float(x))


CASES = {
    "loha linear": {FF: dict(hada_w1_a=rnd(64, 2), hada_w1_b=rnd(2, 8), hada_w2_a=rnd(64, 2), hada_w2_b=rnd(2, 8), alpha=a(1))},
    "loha conv flattened": {CONV: dict(hada_w1_a=rnd(8, 2), hada_w1_b=rnd(2, 72), hada_w2_a=rnd(8, 2),
                                       hada_w2_b=rnd(2, 72), alpha=a(3))},
    "loha tucker conv": {CONV: dict(hada_t1=rnd(2, 2, 3, 3), hada_w1_a=rnd(2, 8), hada_w1_b=rnd(2, 8),
                                    hada_t2=rnd(2, 2, 3, 3), hada_w2_a=rnd(2, 8), hada_w2_b=rnd(2, 8), alpha=a(1))},
    "lokr w1 full, w2 decomposed": {FF: dict(lokr_w1=rnd(8, 2), lokr_w2_a=rnd(8, 2), lokr_w2_b=rnd(2, 4), alpha=a(1))},
    "lokr both full": {K: dict(lokr_w1=rnd(4, 4), lokr_w2=rnd(4, 8), alpha=a(7))},  # alpha has no effect
    "lokr decomposed both": {K: dict(lokr_w1_a=rnd(4, 1), lokr_w1_b=rnd(1, 4), lokr_w2_a=rnd(4, 1),
                                     lokr_w2_b=rnd(1, 8), alpha=a(0.5))},
    "lokr conv flattened": {CONV: dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(4, 2), lokr_w2_b=rnd(2, 36), alpha=a(1))},
    "lokr tucker conv": {CONV: dict(lokr_w1=rnd(2, 2), lokr_t2=rnd(2, 2, 3, 3), lokr_w2_a=rnd(2, 4),
                                    lokr_w2_b=rnd(2, 4), alpha=a(1))},
    "no alpha": {FF: dict(hada_w1_a=rnd(64, 2), hada_w1_b=rnd(2, 8), hada_w2_a=rnd(64, 2), hada_w2_b=rnd(2, 8)),
                 K: dict(lokr_w1_a=rnd(4, 2), lokr_w1_b=rnd(2, 4), lokr_w2_a=rnd(4, 2), lokr_w2_b=rnd(2, 8))},
    "dora output axis": {TE: {"lora_down.weight": rnd(4, 32), "lora_up.weight": rnd(32, 4), "alpha": a(2),
                              "dora_scale": rnd(32, 1).abs() + 1},
                         CONV: {"lora_down.weight": rnd(2, 8, 3, 3), "lora_up.weight": rnd(8, 2, 1, 1), "alpha": a(1),
                                "dora_scale": rnd(8, 1, 1, 1).abs() + 1}},
    "dora input axis": {K: {"lora_down.weight": rnd(4, 32), "lora_up.weight": rnd(16, 4), "alpha": a(2),
                            "dora_scale": rnd(1, 32).abs() + 1},
                        PROJ: {"lora_down.weight": rnd(2, 8, 1, 1), "lora_up.weight": rnd(8, 2, 1, 1), "alpha": a(1),
                               "dora_scale": rnd(1, 8, 1, 1).abs() + 1}},
    "loha dora": {FF: dict(hada_w1_a=rnd(64, 2), hada_w1_b=rnd(2, 8), hada_w2_a=rnd(64, 2), hada_w2_b=rnd(2, 8),
                           alpha=a(1), dora_scale=rnd(64, 1).abs() + 1)},
    "locon tucker conv": {CONV: {"lora_down.weight": rnd(2, 8, 1, 1), "lora_mid.weight": rnd(2, 2, 3, 3),
                                 "lora_up.weight": rnd(8, 2, 1, 1), "alpha": a(1)}},
}


def write(path, modules, metadata=None):
    state = {f"{kohya_name(key)}.{part}": t for key, parts in modules.items() for part, t in parts.items()}
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", CASES)
def test_lycoris_files_merge_as_the_published_formulas(tiny_sd1, tmp_path, case):
    lora, fmt = read_lora(write(tmp_path / "l.safetensors", CASES[case]))
    assert fmt == "kohya" and set(lora.modules) == set(CASES[case])
    for key, parts in CASES[case].items():
        w = weight_of(tiny_sd1, key)
        m = lora.modules[key]
        assert m.weight_shape() == tuple(w.shape) and m.is_3x3 == (key == CONV)
        got = m.merged(w, STRENGTH)
        want = expected(w, parts)
        assert (got - want).abs().max() <= 1e-5, (case, key)
        assert (got - w).abs().max() > 1e-3  # the module does something


def test_lokr_with_full_factors_ignores_alpha_and_decomposed_uses_its_rank(tmp_path):
    full, decomposed = CASES["lokr both full"][K], CASES["lokr decomposed both"][K]
    lora = read_lora(write(tmp_path / "l.safetensors", {K: full}))[0]
    assert lora.modules[K].scale == 1.0
    lora = read_lora(write(tmp_path / "d.safetensors", {K: decomposed}))[0]
    assert lora.modules[K].scale == 0.5 / 1


def test_no_alpha_means_scale_one(tmp_path):
    lora = read_lora(write(tmp_path / "l.safetensors", CASES["no alpha"]))[0]
    assert lora.modules[FF].alpha == 2 and lora.modules[K].alpha == 2
    assert [m.scale for m in lora.modules.values()] == [1.0, 1.0]


# --- written back: LyCORIS names, metadata, exact round trips -------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c not in ("locon tucker conv", "no alpha")])
def test_kohya_round_trip_is_exact(tmp_path, case):
    src = write(tmp_path / "in.safetensors", CASES[case], metadata={"ss_output_name": "x", "ss_network_dim": "2"})
    out = save_lora(read_lora(src)[0], tmp_path / "out.safetensors")
    a_, b_ = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(out))
    assert set(a_) == set(b_)
    for k in a_:
        assert torch.equal(a_[k], b_[k]), k
    again = save_lora(read_lora(out)[0], tmp_path / "again.safetensors")
    assert read_lora(again)[0].metadata == read_lora(out)[0].metadata  # metadata travels, hashes included
    assert read_lora(out)[0].metadata["ss_output_name"] == "x"


def test_no_alpha_is_written_as_rank_and_lora_mid_folded(tiny_sd1, tmp_path):
    for case in ("no alpha", "locon tucker conv"):
        src = write(tmp_path / f"{case}.safetensors", CASES[case])
        out = read_lora(save_lora(read_lora(src)[0], tmp_path / f"{case}-out.safetensors"))[0]
        for key, parts in CASES[case].items():
            w = weight_of(tiny_sd1, key)
            assert (out.modules[key].merged(w, STRENGTH) - expected(w, parts)).abs().max() <= 1e-5


def metadata_of(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("case, algo", [("loha conv flattened", "loha"), ("lokr decomposed both", "lokr"),
                                        ("dora output axis", "locon"), ("loha tucker conv", "loha")])
def test_written_metadata_says_lycoris_and_the_algo(tmp_path, case, algo):
    out = save_lora(read_lora(write(tmp_path / "in.safetensors", CASES[case]))[0], tmp_path / "out.safetensors")
    meta = metadata_of(out)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == algo
    assert ("conv_dim" in args) == (CONV in CASES[case])
    if case.startswith("dora"):
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    if "tucker" in case:
        assert args["use_tucker"] == "True"
    if "decomposed both" in case:
        assert args["decompose_both"] == "True"
    assert meta["sshs_model_hash"] and meta["sshs_legacy_hash"]


def test_metadata_of_the_other_family_is_replaced_and_its_own_kept(tmp_path):
    lora = read_lora(write(tmp_path / "in.safetensors", CASES["loha linear"]))[0]
    lora.metadata.update(ss_network_module="networks.lora", ss_network_dim="4", ss_network_args='{"conv_dim": "4"}')
    meta = metadata_of(save_lora(lora, tmp_path / "a.safetensors"))
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    lora.metadata.update(ss_network_module="lycoris.kohya", ss_network_args='{"algo": "loha", "preset": "full"}')
    meta = metadata_of(save_lora(lora, tmp_path / "b.safetensors"))  # training's own args are kept
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "preset": "full"}


def test_dora_magnitude_is_written_per_output_row(tmp_path):
    """PEFT keeps the magnitude as [out]: files get LyCORIS' [out, 1] / [out, 1, 1, 1]."""
    lora = read_lora(write(tmp_path / "in.safetensors", CASES["dora output axis"]))[0]
    for m in lora.modules.values():
        m.dora_scale = m.dora_scale.flatten()
    state = safetensors.torch.load_file(str(save_lora(lora, tmp_path / "out.safetensors")))
    assert state[kohya_name(TE) + ".dora_scale"].shape == (32, 1)
    assert state[kohya_name(CONV) + ".dora_scale"].shape == (8, 1, 1, 1)


def test_kohya_to_kohya_conversion_keeps_everything(tmp_path):
    src = write(tmp_path / "in.safetensors", CASES["lokr tucker conv"], metadata={"ss_network_module": "lycoris.kohya",
                "ss_network_args": '{"algo": "lokr", "use_tucker": "True", "factor": "2"}', "ss_seed": "5"})
    out = convert_lora_file(src, tmp_path / "out.safetensors", "kohya")
    meta = metadata_of(out)
    assert meta["ss_seed"] == "5" and json.loads(meta["ss_network_args"])["factor"] == "2"
    a_, b_ = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(out))
    assert a_.keys() == b_.keys() and all(torch.equal(a_[k], b_[k]) for k in a_)


def test_sdxl_names_carry_every_kind(tmp_path):
    sdxl_te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    mods = {sdxl_te2: CASES["lokr decomposed both"][K], TE: CASES["loha linear"][FF]}
    lora = read_lora(write(tmp_path / "in.safetensors", mods))[0]
    out = save_lora(lora, tmp_path / "out.safetensors")
    keys = set(safetensors.torch.load_file(str(out)))
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a" in keys
    assert read_lora(out)[0].modules.keys() == mods.keys()
