"""Our kohya files as ComfyUI, AUTOMATIC1111 and sd-scripts load them.

Each loader's key mapping and patch arithmetic is re-implemented below, small, from its published
source (file and function named at each piece: the facts carry over, no code is copied). ComfyUI and
AUTOMATIC1111 patch the model in the original single-file layout and only log keys they cannot map, so
a misnamed file silently does nothing there; sd-scripts names modules after its own diffusers-layout
U-Net and transformers-4 text encoder and silently skips names it does not create. For every loader:
(a) every tensor of the file is used, on a weight that exists; (b) the weights it produces equal our
own merge (`merge_into_models` of the LoRA we wrote, mapped to the loader's layout by our
original-layout key map) to 1e-6 in float32.

The U-Net has SD's block structure (4 levels of 2 resnets, attention in the first 3, 3x3 convs
adapted through conv_dim): AUTOMATIC1111's name conversion hard-codes SD's block numbering, so the
2-level tiny U-Net would not be a fair model of a real file there.
"""

import copy
import dataclasses
import math
import re

import pytest
import safetensors.torch
import torch

from lora_sd.formats import save_lora
from lora_sd.lora_weights import LoraModule, LoraWeights, model_module_name
from lora_sd.models import original_layout_state_dict
from lora_sd.ops.merge import merge_into_models
from tests.helpers import random_lora

STRENGTH = 0.7  # ComfyUI strength_model/strength_clip, A1111 te/unet multiplier, sd-scripts multiplier


def sd_shaped(tiny):
    """`tiny` with a U-Net of SD's block structure (channels and heads still tiny)."""
    from diffusers import UNet2DConditionModel

    from lora_sd.tiny import unet_config

    config = dict(unet_config(tiny.version), block_out_channels=(8, 8, 16, 16), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if tiny.version == "sd2":
        config["attention_head_dim"] = (2, 2, 4, 4)
    torch.manual_seed(0)
    return dataclasses.replace(tiny, unet=UNet2DConditionModel(**config).eval())


@dataclasses.dataclass
class Case:
    version: str
    base: object  # SDModel before the LoRA
    merged: object  # SDModel with our merge of the LoRA at STRENGTH
    file: dict  # the kohya file's tensors, read as the loaders read it (safetensors load_file)


def make_case(tiny, tmp_path):
    """Write a random LoRA with our writer: rank 4 / alpha 3, 3x3 convs at rank 3 / alpha 1."""
    base = sd_shaped(tiny)
    lora = random_lora(base, network_dim=4, network_alpha=3, conv_dim=3, conv_alpha=1, scale=0.3)
    path = save_lora(lora, tmp_path / "lora.safetensors", version=tiny.version)
    merged = dataclasses.replace(base, unet=copy.deepcopy(base.unet), text_encoder=copy.deepcopy(base.text_encoder))
    # the LoRA as built, not as read back: a writer that loses the alpha must show
    merge_into_models([lora], [STRENGTH], {"unet": merged.unet, "text_encoder": merged.text_encoder})
    return Case(tiny.version, base, merged, safetensors.torch.load_file(str(path)))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request, tmp_path_factory):
    return make_case(request.getfixturevalue(f"tiny_{request.param}"), tmp_path_factory.mktemp(request.param))


def checkpoints(case):
    """(base, merged) original-layout state dicts; the merged one keeps the base's extra keys, as
    merging into a single file does."""
    base = original_layout_state_dict(case.base)
    return base, original_layout_state_dict(case.merged, original_state_dict=base)


def assert_same_patch(patched, expected, base, loader, tolerance=1e-6):
    """The loader changed exactly the weights our merge changed, to the same values."""
    assert set(patched) == set(expected) == set(base)
    ours = {k for k in base if not torch.equal(expected[k], base[k])}
    theirs = {k for k in base if not torch.equal(patched[k], base[k])}
    assert ours, "our merge changed no weight"
    assert not ours - theirs, f"{loader} leaves unpatched: {sorted(ours - theirs)[:3]}"
    assert not theirs - ours, f"{loader} patches weights our merge does not: {sorted(theirs - ours)[:3]}"
    worst = max(ours, key=lambda k: (patched[k] - expected[k]).abs().max())
    diff = (patched[worst] - expected[worst]).abs().max().item()
    assert diff <= tolerance, f"{loader}: {worst} differs from our merge by {diff:g}"


# --- ComfyUI ------------------------------------------------------------------------------------
# comfy/sd.py load_lora_for_models: key_map = model_lora_keys_unet + model_lora_keys_clip (comfy/lora.py),
# patches = load_lora(file, key_map), ModelPatcher.add_patches keeps the keys the model has, and
# weight_adapter/lora.py LoRAAdapter.calculate_weight adds each patch to the weight.

# comfy/lora.py LORA_CLIP_MAP: the only text-encoder modules model_lora_keys_clip maps.
COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}
# comfy/utils.py UNET_MAP_RESNET / UNET_MAP_ATTENTIONS / TRANSFORMER_BLOCKS: the weights
# unet_to_diffusers knows ({original: diffusers} inside a resnet; same names elsewhere).
COMFY_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
COMFY_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def comfy_state(ckpt, version):
    """The state dict ComfyUI patches, from an original-layout checkpoint.

    U-Net: `model.diffusion_model.*` -> `diffusion_model.*` (comfy/model_base.py BaseModel).
    SD1 text encoder: supported_models.py SD15.process_clip_state_dict, `cond_stage_model.` -> `clip_l.`.
    SD2: SD20.process_clip_state_dict, `cond_stage_model.model.` -> `clip_h.`, then
    utils.clip_text_transformers_convert / transformers_convert: OpenCLIP block names to transformers
    names under `clip_h.transformer.text_model.encoder.layers.N.`, in_proj split into q, k, v.
    """
    out, open_clip = {}, {}
    for k, v in ckpt.items():
        if k.startswith("model.diffusion_model."):
            out[k[len("model."):]] = v
        elif version == "sd1" and k.startswith("cond_stage_model."):
            out["clip_l." + k[len("cond_stage_model."):]] = v
        elif version == "sd2" and k.startswith("cond_stage_model.model."):
            open_clip[k[len("cond_stage_model.model."):]] = v
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    layer_prefix = "clip_h.transformer.text_model.encoder.layers."
    for k, v in open_clip.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m is None:
            out["clip_h." + k] = v  # embeddings, ln_final, projection: no LoRA targets
            continue
        layer, rest = m.groups()
        if rest.startswith("attn.in_proj_"):
            param = rest[len("attn.in_proj_"):]
            for part, t in zip("qkv", v.chunk(3)):
                out[f"{layer_prefix}{layer}.self_attn.{part}_proj.{param}"] = t
            continue
        module, param = rest.rsplit(".", 1)
        out[f"{layer_prefix}{layer}.{renames[module]}.{param}"] = v
    return out


def comfy_unet_to_diffusers(state):
    """{diffusers module: original module}: comfy/utils.py unet_to_diffusers, fed the config that
    comfy/model_detection.py detect_unet_config reads from the checkpoint (res blocks per level,
    transformer depth per input / output block, middle depth)."""
    keys = {k[len("diffusion_model."):] for k in state if k.startswith("diffusion_model.")}

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})

    def depth(block):
        return count(f"{block}.1.transformer_blocks.")

    n_in, n_out = count("input_blocks."), count("output_blocks.")
    res_per_level, in_depths, res = [], [], 0
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in keys:  # a downsampler ends a level
            res_per_level.append(res)
            res = 0
        else:
            res += 1
            in_depths.append(depth(f"input_blocks.{i}"))
    res_per_level.append(res)
    out_depths = [depth(f"output_blocks.{o}") for o in range(n_out)]

    m = {}

    def resnet(diffusers, original):
        for o, d in COMFY_RESNET.items():
            m[f"{diffusers}.{d}"] = f"{original}.{o}"

    def attention(diffusers, original, n_blocks):
        for a in COMFY_ATTENTION:
            m[f"{diffusers}.{a}"] = f"{original}.{a}"
        for t in range(n_blocks):
            for b in COMFY_BLOCK:
                m[f"{diffusers}.transformer_blocks.{t}.{b}"] = f"{original}.transformer_blocks.{t}.{b}"

    for x, n_res in enumerate(res_per_level):
        n = 1 + (n_res + 1) * x
        for i in range(n_res):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            d = in_depths.pop(0)
            if d > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", depth("middle_block"))
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    for x, n_res in enumerate(reversed(res_per_level)):
        n = (n_res + 1) * x
        for i in range(n_res + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            c = 1
            if out_depths[n] > 0:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", out_depths[n])
                c = 2
            if i == n_res:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    return m


def comfy_key_map(state):
    """{LoRA module name: model weight key}: comfy/lora.py model_lora_keys_unet + model_lora_keys_clip."""
    key_map = {}
    for k in state:  # original-layout names, `.` -> `_`
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for diffusers, original in comfy_unet_to_diffusers(state).items():  # diffusers names, `.` -> `_`
        key_map["lora_unet_" + diffusers.replace(".", "_")] = f"diffusion_model.{original}.weight"
    for clip in ("clip_l", "clip_h"):
        for b in range(32):
            for module, short in COMFY_CLIP.items():
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{module}.weight"
                if k in state:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{short}"] = k
    return key_map


# the tensors ComfyUI's adapters look for (weight_adapter/lora.py, loha.py, lokr.py *.load), per kind
COMFY_PARTS = {"lora": ("lora_up.weight", "lora_down.weight"),
               "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
               "lokr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}


def comfy_load(file, state, strength):
    """(patched state, file keys ComfyUI does not load)."""
    patches, loaded = {}, set()
    for name, target in comfy_key_map(state).items():  # comfy/lora.py load_lora
        alpha, dora = None, None
        if f"{name}.alpha" in file:
            alpha = file[f"{name}.alpha"].item()
            loaded.add(f"{name}.alpha")
        if f"{name}.dora_scale" in file:  # read for every key, whichever adapter takes it
            dora = file[f"{name}.dora_scale"]
            loaded.add(f"{name}.dora_scale")
        for kind, parts in COMFY_PARTS.items():  # weight_adapter.adapters, in order: the first that loads wins
            t = {p: file[f"{name}.{p}"] for p in parts if f"{name}.{p}" in file}
            if t:
                patches[target] = (kind, t, alpha, dora)
                loaded |= {f"{name}.{p}" for p in t}
                break
    out = dict(state)
    for key, (kind, t, alpha, dora) in patches.items():
        if key not in out:  # ModelPatcher.add_patches: keys the model lacks are dropped
            continue
        w = out[key]
        diff, scale = comfy_diff(kind, {p: v.float() for p, v in t.items()}, alpha, w.shape)
        if dora is not None:
            out[key] = comfy_weight_decompose(dora.float(), w, diff, scale, strength)
        else:
            out[key] = w + (strength * scale * diff).to(w.dtype)
    return out, set(file) - loaded


def comfy_tucker(t, wa, wb):  # einsum('i j k l, j r, i p -> p r k l', t, wb, wa) in loha.py / lokr.py
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def comfy_diff(kind, t, alpha, shape):
    """(diff reshaped to the weight, scale): calculate_weight of LoRAAdapter (alpha / rank of lora_down, 1 without
    alpha), LoHaAdapter (alpha / rank of hada_w1_b) and LoKrAdapter (alpha / rank of the decomposed factor, w2's
    taking precedence; 1 when neither factor is decomposed)."""
    if kind == "lora":
        down = t["lora_down.weight"]
        diff = torch.mm(t["lora_up.weight"].flatten(1), down.flatten(1))
        return diff.reshape(shape), (alpha / down.shape[0] if alpha is not None else 1.0)
    if kind == "loha":
        if "hada_t1" in t:
            m1 = comfy_tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            m2 = comfy_tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            m1, m2 = torch.mm(t["hada_w1_a"], t["hada_w1_b"]), torch.mm(t["hada_w2_a"], t["hada_w2_b"])
        return (m1 * m2).reshape(shape), (alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0)
    dim = None
    w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = comfy_tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]) if "lokr_t2" in t else \
            torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2.contiguous()).reshape(shape), scale


def comfy_weight_decompose(dora_scale, weight, diff, alpha, strength):
    """weight_adapter/base.py weight_decompose (as of ComfyUI v0.3.77): the output axis when dora_scale's first
    size is the weight's, the norm then taken of the ORIGINAL weight; else the input axis, the norm of W + dW;
    eps added to the norm; a strength s gives W + s (W' - W)."""
    calc = weight + diff * alpha
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))
    return weight + strength * (calc - weight)


def test_comfyui_uses_every_key_and_patches_as_our_merge(case):
    base, merged = checkpoints(case)
    state = comfy_state(base, case.version)
    patched, not_loaded = comfy_load(case.file, state, STRENGTH)
    assert not not_loaded, f"ComfyUI: 'lora key not loaded' for {sorted(not_loaded)[:3]}"
    assert_same_patch(patched, comfy_state(merged, case.version), state, "ComfyUI")


# --- AUTOMATIC1111 ------------------------------------------------------------------------------
# extensions-builtin/Lora/networks.py: load_network converts each file name with
# convert_diffusers_name_to_compvis and looks it up in network_layer_mapping; network_apply_weights adds
# NetworkModuleLora.calc_updown (network_lora.py, lyco_helpers.rebuild_conventional, network.py
# finalize_updown) to the weight.

A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                "conv_shortcut": "skip_connection"}  # networks.py suffix_conversion["resnets"]


def a1111_layers(ckpt):
    """network_layer_mapping (networks.py assign_network_names_to_compvis_modules): the module names of
    `cond_stage_model.wrapped` and `sd_model.model`, `.` -> `_`; here read from the checkpoint keys of
    their weights. Returns ({name: weight key}, {MultiheadAttention name: in_proj_weight key})."""
    layers, mha = {}, {}
    for k in ckpt:
        for prefix in ("model.", "cond_stage_model."):
            if k.startswith(prefix):
                path = k[len(prefix):]
                if path.endswith(".in_proj_weight"):  # SD2's OpenCLIP attention: a MultiheadAttention
                    mha[path[:-len(".in_proj_weight")].replace(".", "_")] = k
                elif path.endswith(".weight"):
                    layers[path[:-len(".weight")].replace(".", "_")] = k
    return layers, mha


def a1111_compvis_name(key, is_sd2):
    """networks.py convert_diffusers_name_to_compvis (SD's fixed block numbering: 3 per level)."""
    def match(pattern):
        m = re.match(pattern, key)
        return m and [int(g) if g.isdigit() else g for g in m.groups()]

    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
        rest = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"model_transformer_resblocks_{m[0]}_{rest}"
    return key


def a1111_updown(w, orig, multiplier):
    """The module network_apply_weights builds from the file's parts (networks.py module_types: the first whose
    create_module takes them): NetworkModuleLora, NetworkModuleHada or NetworkModuleLokr calc_updown, then
    network.py finalize_updown: reshaped to the weight when the sizes agree, times calc_scale (alpha / dim, 1
    without alpha or dim), DoRA's apply_weight_decompose (per input column only), times the multiplier."""
    w = {k: v.float() for k, v in w.items()}
    weight_shape = orig.shape
    if "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        if len(weight_shape) == 2:  # a Linear (or MultiheadAttention): 2-D factors
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        elif down.dim() == 2:  # a Conv2d: a 2-D down becomes a 1x1 conv
            down = down.reshape(*down.shape, 1, 1)
        shape = [up.shape[0], down.shape[1], *down.shape[2:]]
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)  # rebuild_conventional
        dim = down.shape[0]
    elif "hada_w1_a" in w:  # network_hada.py
        def cp(t, wa, wb):  # lyco_helpers.make_weight_cp
            return torch.einsum("ijkl,ip->pjkl", torch.einsum("ijkl,jr->irkl", t, wb), wa)
        if "hada_t1" in w:
            shape = [w["hada_w1_a"].shape[1], w["hada_w1_b"].shape[1], *w["hada_t1"].shape[2:]]
            updown = cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]) * cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
        else:
            shape = [w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]]
            updown = (w["hada_w1_a"] @ w["hada_w1_b"]).reshape(shape) * (w["hada_w2_a"] @ w["hada_w2_b"]).reshape(shape)
        dim = w["hada_w1_b"].shape[0]
    else:  # network_lokr.py
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = torch.einsum("ijkl,ip->pjkl", torch.einsum("ijkl,jr->irkl", w["lokr_t2"], w["lokr_w2_b"]), w["lokr_w2_a"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        shape = list(weight_shape) if len(weight_shape) == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        updown = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2.contiguous()).reshape(shape)
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if updown.numel() == torch.Size(weight_shape).numel():
        updown = updown.reshape(weight_shape)
    scale = w["alpha"].item() / dim if "alpha" in w and dim is not None else 1.0
    updown = updown * scale
    if "dora_scale" in w:  # apply_weight_decompose
        merged = updown + orig.float()
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (len(weight_shape) - 1)).transpose(0, 1)
        updown = merged * (w["dora_scale"] / norm) - orig.float()
    return updown * multiplier


def a1111_load(file, ckpt, multiplier):
    """(patched checkpoint, file keys A1111 fails to match)."""
    layers, mha = a1111_layers(ckpt)
    is_sd2 = bool(mha)  # networks.py: 'model_transformer_resblocks' in network_layer_mapping
    matched, failed = {}, set()
    for key_network, weight in file.items():  # networks.py load_network
        base_name, part = key_network.split(".", 1)
        key = a1111_compvis_name(base_name, is_sd2)
        found = key in layers or key in mha
        if not found and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            found = m.group(1) in layers or m.group(1) in mha  # SD2 q/k/v: the MultiheadAttention
        if not found and "lora_unet" in base_name:  # files already in compvis names (SDXL)
            key = base_name.replace("lora_unet", "diffusion_model")
            found = key in layers
        if not found:
            failed.add(key_network)
            continue
        matched.setdefault(key, {})[part] = weight
    out = dict(ckpt)
    for name, w in matched.items():  # network_apply_weights, on each Linear / Conv2d
        if name not in layers or name.removesuffix("_out_proj") in mha:
            continue  # MultiheadAttention parts: below (its forward never calls out_proj's)
        k = layers[name]
        out[k] = out[k] + a1111_updown(w, out[k], multiplier).to(out[k].dtype)
    for name, in_proj in mha.items():  # network_apply_weights on a MultiheadAttention: all four or nothing
        parts = [matched.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if all(parts):
            qkv = torch.vstack([a1111_updown(p, out[in_proj], multiplier) for p in parts[:3]])
            out[in_proj] = out[in_proj] + qkv
            o = layers[f"{name}_out_proj"]
            out[o] = out[o] + a1111_updown(parts[3], out[o], multiplier)
    return out, failed


def test_automatic1111_uses_every_key_and_patches_as_our_merge(case):
    base, merged = checkpoints(case)
    patched, failed = a1111_load(case.file, base, STRENGTH)
    assert not failed, f"AUTOMATIC1111: 'Failed to match keys' for {sorted(failed)[:3]}"
    assert_same_patch(patched, merged, base, "AUTOMATIC1111")


# --- sd-scripts ---------------------------------------------------------------------------------
# networks/lora.py create_network_from_weights: dims and alphas from the file, LoRANetwork.create_modules
# names every Linear / Conv2d inside the target classes of its own models; LoRAInfModule.merge_to (and
# merge_lora.py merge_to_sd_model) adds multiplier * scale * up @ down to each weight.

SDS_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")  # with the 3x3 ones
SDS_TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def sds_modules(unet, text_encoder):
    """{LoRA name: our state-dict key of its weight} for the modules LoRANetwork creates."""
    names = {}
    for prefix, component, root, classes in (("lora_te", "text_encoder", text_encoder, SDS_TE_CLASSES),
                                             ("lora_unet", "unet", unet, SDS_UNET_CLASSES)):
        for name, module in root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    path = f"{name}.{child_name}"
                    # sd-scripts runs on transformers 4, whose CLIPTextModel nests everything in text_model.
                    named = path if component == "unet" or path.startswith("text_model.") else "text_model." + path
                    names[f"{prefix}.{named}".replace(".", "_")] = f"{component}.{path}.weight"
    return names


def model_state(model):
    return {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(model, c).state_dict().items()}


def sds_load(file, model, multiplier):
    """(merged state, file keys of modules sd-scripts does not create)."""
    modules = sds_modules(model.unet, model.text_encoder)
    dims, alphas = {}, {}
    for key, value in file.items():  # create_network_from_weights
        name = key.split(".")[0]
        if "alpha" in key:
            alphas[name] = value
        elif "lora_down" in key:
            dims[name] = value.shape[0]
    out = model_state(model)
    for name, weight_key in modules.items():
        if name not in dims:
            continue
        alpha = float(alphas.get(name, dims[name]))  # no alpha: alpha = rank
        scale = (alpha or dims[name]) / dims[name]  # LoRAModule: alpha 0 means alpha = rank
        sd = {k[len(name) + 1:]: v for k, v in file.items() if k.startswith(name)}  # LoRANetwork.merge_to
        up, down, w = sd["lora_up.weight"].float(), sd["lora_down.weight"].float(), out[weight_key]
        if w.dim() == 2:  # LoRAInfModule.merge_to: linear
            delta = up @ down
        elif down.shape[2:4] == (1, 1):  # conv2d 1x1
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:  # conv2d 3x3
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        out[weight_key] = (w + multiplier * delta * scale).to(w.dtype)
    return out, {k for k in file if k.split(".")[0] not in modules}


def test_sd_scripts_uses_every_key_and_merges_as_our_merge(case):
    patched, unused = sds_load(case.file, case.base, STRENGTH)
    assert not unused, f"sd-scripts creates no module for {sorted(unused)[:3]}"
    assert_same_patch(patched, model_state(case.merged), model_state(case.base), "sd-scripts")


# --- LyCORIS kinds: LoHa, LoKr, DoRA -----------------------------------------------------------------

def divisor(n):
    """The smallest factor > 1 of n (n itself when prime): LoKr's split of a dimension (LyCORIS factorization)."""
    return next((d for d in range(2, n) if n % d == 0), n)


def kind_module(kind, m, weight, i, gen):
    """A module of `kind` on the weight `m` adapts, varied by `i` as LyCORIS writes them: LoHa (Tucker on every
    other 3x3 conv), LoKr (w1 full + w2 decomposed, both full, both decomposed; Tucker on 3x3 convs), DoRA per
    output row (what we write) or per input column (what older LyCORIS wrote)."""
    def r(*shape):
        return torch.randn(shape, generator=gen) * 0.3

    shape = tuple(weight.shape)
    out, inp, kernel = shape[0], shape[1], shape[2:]
    flat = inp * math.prod(kernel)
    if kind == "loha":
        if kernel not in ((), (1, 1)) and i % 2:
            t = dict(hada_t1=r(2, 2, *kernel), hada_w1_a=r(2, out), hada_w1_b=r(2, inp),
                     hada_t2=r(2, 2, *kernel), hada_w2_a=r(2, out), hada_w2_b=r(2, inp))
        else:
            t = dict(hada_w1_a=r(out, 2), hada_w1_b=r(2, flat), hada_w2_a=r(out, 2), hada_w2_b=r(2, flat))
        return LoraModule.of_kind("loha", t, 1.5, shape=shape)
    if kind == "lokr":
        a, c = divisor(out), divisor(inp)
        b, d = out // a, inp // c * math.prod(kernel)
        variant = i % 3
        if variant == 0:
            t = dict(lokr_w1=r(a, c), lokr_w2_a=r(b, 2), lokr_w2_b=r(2, d))
        elif variant == 1:
            t = dict(lokr_w1=r(a, c), lokr_w2=r(b, d))  # both full: alpha has no effect
        elif kernel not in ((), (1, 1)):
            t = dict(lokr_w1_a=r(a, 2), lokr_w1_b=r(2, c), lokr_t2=r(2, 2, *kernel), lokr_w2_a=r(2, b),
                     lokr_w2_b=r(2, inp // c))
        else:
            t = dict(lokr_w1_a=r(a, 1), lokr_w1_b=r(1, c), lokr_w2_a=r(b, 1), lokr_w2_b=r(1, d))
        return LoraModule.of_kind("lokr", t, 1.5, shape=shape)
    noise = 1 + 0.1 * torch.rand(out if kind == "dora" else inp, generator=gen)
    if kind == "dora":  # PEFT's [out], written [out, 1...]
        magnitude = weight.flatten(1).norm(dim=1) * noise
    else:
        magnitude = (weight.transpose(0, 1).flatten(1).norm(dim=1) * noise).reshape(1, inp, *[1] * len(kernel))
    return LoraModule(m.down, m.up, m.alpha, dora_scale=magnitude)


def make_kind_case(tiny, tmp_path, kind):
    """A LoRA of `kind` on the modules make_case adapts, written with our writer, and our merge of it
    (LoraModule.merged on every adapted weight: the formulas of FORMATS.md, DoRA included)."""
    base = sd_shaped(tiny)
    lora = random_lora(base, network_dim=4, network_alpha=3, conv_dim=3, conv_alpha=1, scale=0.3)
    gen = torch.Generator().manual_seed(3)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}

    def layer(parts, key):
        component, path = key.split(".", 1)
        model = parts[component]
        return dict(model.named_modules())[model_module_name(component, path, model)]

    lora = LoraWeights({k: kind_module(kind, m, layer(models, k).weight.detach(), i, gen)
                        for i, (k, m) in enumerate(lora.modules.items())})
    path = save_lora(lora, tmp_path / f"{kind}.safetensors", version=tiny.version)
    merged = dataclasses.replace(base, unet=copy.deepcopy(base.unet), text_encoder=copy.deepcopy(base.text_encoder))
    with torch.no_grad():
        for key, m in lora.modules.items():
            w = layer({"unet": merged.unet, "text_encoder": merged.text_encoder}, key).weight
            w.copy_(m.merged(w, STRENGTH))
    return Case(tiny.version, base, merged, safetensors.torch.load_file(str(path)))


KINDS = ["loha", "lokr", "dora_input"]


@pytest.fixture(scope="module", params=[(v, k) for v in ("sd1", "sd2") for k in KINDS], ids=lambda p: "-".join(p))
def kind_case(request, tmp_path_factory):
    version, kind = request.param
    return make_kind_case(request.getfixturevalue(f"tiny_{version}"), tmp_path_factory.mktemp(version + kind), kind)


def test_comfyui_uses_every_lycoris_key_and_patches_as_our_merge(kind_case):
    base, merged = checkpoints(kind_case)
    state = comfy_state(base, kind_case.version)
    patched, not_loaded = comfy_load(kind_case.file, state, STRENGTH)
    assert not not_loaded, f"ComfyUI: 'lora key not loaded' for {sorted(not_loaded)[:3]}"
    assert_same_patch(patched, comfy_state(merged, kind_case.version), state, "ComfyUI", tolerance=1e-5)


def test_automatic1111_uses_every_lycoris_key_and_patches_as_our_merge(kind_case):
    if kind_case.version == "sd2" and any(k.endswith(".dora_scale") and "lora_te_" in k for k in kind_case.file):
        pytest.skip("A1111 applies SD2 text-encoder q/k/v modules against the fused in_proj_weight: DoRA's "
                    "normalisation there fails (its DoRA support covers separate weights only)")
    base, merged = checkpoints(kind_case)
    patched, failed = a1111_load(kind_case.file, base, STRENGTH)
    assert not failed, f"AUTOMATIC1111: 'Failed to match keys' for {sorted(failed)[:3]}"
    assert_same_patch(patched, merged, base, "AUTOMATIC1111", tolerance=1e-5)


def change(patched, expected, base):
    """(largest difference from our merge, largest change our merge makes) over the weights."""
    return (max((patched[k] - expected[k]).abs().max().item() for k in base),
            max((expected[k] - base[k]).abs().max().item() for k in base))


def test_dora_per_output_row_in_comfyui_and_automatic1111(tiny_sd1, tmp_path):
    """What the DoRA files we write (dora_scale [out, 1...], LyCORIS' wd_on_output and PEFT's convention) become:
    ComfyUI loads every key and recognises the axis, but normalises the original weight instead of W + dW, so it
    is off by the factor ||W + dW|| / ||W|| per row; AUTOMATIC1111 knows only the input axis: it broadcasts
    [out, 1] against its [1, in] norm without an error, so the weights are wrong."""
    case = make_kind_case(tiny_sd1, tmp_path, "dora")
    base, merged = checkpoints(case)
    state = comfy_state(base, "sd1")
    patched, not_loaded = comfy_load(case.file, state, STRENGTH)
    assert not not_loaded
    off, dora_change = change(patched, comfy_state(merged, "sd1"), state)
    assert off > 1e-2 * dora_change, (off, dora_change)  # not our (PEFT's, LyCORIS') DoRA
    patched, failed = a1111_load(case.file, base, STRENGTH)
    assert not failed
    off_a1111, _ = change(patched, merged, base)
    assert off_a1111 > 1e-2 * dora_change, (off_a1111, dora_change)


# --- the models above can fail -------------------------------------------------------------------

def rename_te_like_diffusers(file):
    """What diffusers' convert_state_dict_to_kohya writes: `lora_te1_encoder_...`, no `text_model`."""
    return {k.replace("lora_te_text_model_", "lora_te1_"): v for k, v in file.items()}


def alpha_as_rank(file):
    return {k: (torch.tensor(float(file[k.replace(".alpha", ".lora_down.weight")].shape[0])) if k.endswith(".alpha")
                else v) for k, v in file.items()}


@pytest.mark.parametrize("broken", [rename_te_like_diffusers, alpha_as_rank])
def test_the_loader_models_reject_a_broken_file(tiny_sd1, tmp_path, broken):
    case = make_case(tiny_sd1, tmp_path)
    case.file = broken(case.file)
    base, merged = checkpoints(case)
    state = comfy_state(base, "sd1")
    loads = [("ComfyUI", comfy_load(case.file, state, STRENGTH), comfy_state(merged, "sd1"), state),
             ("AUTOMATIC1111", a1111_load(case.file, base, STRENGTH), merged, base),
             ("sd-scripts", sds_load(case.file, case.base, STRENGTH), model_state(case.merged), model_state(case.base))]
    for loader, (patched, unused), expected, before in loads:
        if broken is rename_te_like_diffusers:
            assert unused, f"{loader}: the misnamed text-encoder keys went unnoticed"
        with pytest.raises(AssertionError):
            assert_same_patch(patched, expected, before, loader)
