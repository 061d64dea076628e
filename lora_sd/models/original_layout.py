"""diffusers components -> the original Stable Diffusion single-file layout.

diffusers converts original files to its layout but has no way back, so this
is our own key map: the inverse of `diffusers.loaders.single_file_utils`'
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`. Block
indices are derived from the model's config (levels, layers per block,
attention or not), never from SD's numbers, so tiny models map too. Every
conversion ends with a leftover check: a key we cannot place is an error.
SDXL files use Stability's SGM layout: the same U-Net and VAE names (plus
`label_emb` for the `text_time` embedding), the text encoders under
`conditioner.embedders.0.transformer.` (CLIP) and `conditioner.embedders.1.model.`
(OpenCLIP, as SD 2.x's but with all blocks and its projection).
"""

import re

import torch

from ..errors import FormatError
from .single_file import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

# Inside a U-Net resnet (ldm ResBlock).
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL's text_time embedding (pooled text + size/crop ids); diffusers' DIFFUSERS_TO_LDM_MAPPING names it so
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
# Inside the VAE mid-block attention (ldm AttnBlock uses 1x1 convs).
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
# Inside an OpenCLIP residual block.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split(key):
    """('module.path', 'weight') for 'module.path.weight'."""
    module, _, param = key.rpartition(".")
    return module, param


def _rename_inside(rest, table):
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_block_map(config):
    """{diffusers module prefix: ldm module prefix} for the U-Net's down/mid/up blocks."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise FormatError(f"U-Net layers_per_block {layers!r}: only one number for every block can be written")
    down, up = config["down_block_types"], config["up_block_types"]
    m = {}
    i = 1  # input_blocks.0 is conv_in
    for b, block_type in enumerate(down):
        for j in range(layers):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if "CrossAttn" in block_type:
                m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < len(down) - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    m["mid_block.resnets.0"] = "middle_block.0"
    m["mid_block.attentions.0"] = "middle_block.1"
    m["mid_block.resnets.1"] = "middle_block.2"
    o = 0
    for b, block_type in enumerate(up):
        attn = "CrossAttn" in block_type
        for j in range(layers + 1):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{o}.0"
            if attn:
                m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{o}.1"
            if j == layers and b < len(up) - 1:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{o}.{2 if attn else 1}.conv"
            o += 1
    return m


def _map_with_blocks(key, blocks, inner):
    """Longest matching block prefix, then `inner` renames what follows it."""
    for prefix in sorted(blocks, key=len, reverse=True):
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            if inner is not None and ".resnets." in prefix + ".":
                rest = _rename_inside(rest, inner)
            return blocks[prefix] + "." + rest
    return None


def _rename_all(sd, prefix, what, rename):
    """{prefix + new key: tensor} by `rename(key, tensor) -> (new key or None, tensor)`; None is a leftover."""
    out, left = {}, []
    for key, t in sd.items():
        new, t = rename(key, t)
        if new is None:
            left.append(key)
        else:
            out[prefix + new] = t
    _check_leftovers(left, what)
    return out


def unet_to_original(unet_sd, config):
    """{'model.diffusion_model.<ldm key>': tensor} from a diffusers U-Net state dict."""
    blocks = _unet_block_map(config)

    def rename(key, t):
        module, param = _split(key)
        if module in _UNET_TOP:
            return f"{_UNET_TOP[module]}.{param}", t
        # resnet internals are renamed; attention (SpatialTransformer) internals keep their names
        return _map_with_blocks(key, blocks, _UNET_RESNET), t

    return _rename_all(unet_sd, UNET_PREFIX, "U-Net", rename)


def _vae_block_map(config):
    n = len(config["down_block_types"])
    layers = config["layers_per_block"]
    m = {}
    for i in range(n):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(len(config["up_block_types"])):
        k = len(config["up_block_types"]) - 1 - i  # ldm numbers decoder levels from the bottom
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{k}.block.{j}"
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{k}.upsample.conv"
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        m[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    return m


def vae_to_original(vae_sd, config):
    """{'first_stage_model.<ldm key>': tensor} from a diffusers AutoencoderKL state dict."""
    blocks = _vae_block_map(config)

    def rename(key, t):
        part, _, rest = key.partition(".")
        if part in ("encoder", "decoder") and rest.split(".")[0] in _VAE_TOP:
            return f"{part}.{_rename_inside(rest, _VAE_TOP)}", t
        if part in ("encoder", "decoder", "quant_conv", "post_quant_conv") and (
                "_blocks." not in key and "mid_block." not in key):
            return key, t  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        new = _map_with_blocks(key, blocks, {"conv_shortcut": "nin_shortcut"})
        if new is not None and ".attn_1." in new:
            a, _, inner = new.partition(".attn_1.")
            new = f"{a}.attn_1.{_rename_inside(inner, _VAE_ATTN)}"
            if t.ndim == 2:  # ldm's attention uses 1x1 convs: [out, in] -> [out, in, 1, 1]
                t = t[:, :, None, None]
        return new, t

    return _rename_all(vae_sd, VAE_PREFIX, "VAE", rename)


def _text_key(key):
    # transformers 5 dropped `text_model.` from CLIPTextModel's state dict; files keep it.
    return key.removeprefix("text_model.")


def clip_to_original(text_sd, config, prefix=CLIP_PREFIX):
    """SD 1.x: OpenAI CLIP keys under `cond_stage_model.transformer.text_model.` (SDXL: `prefix`)."""
    out = {prefix + "text_model." + _text_key(k): t for k, t in text_sd.items()}
    n = config["max_position_embeddings"]
    # In original SD 1.x files (transformers 4 saved it): [1, 77] int64.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_original(text_sd, config, prefix=OPEN_CLIP_PREFIX):
    """SD 2.x: OpenCLIP keys under `cond_stage_model.model.` (SDXL: `prefix`); q/k/v fused into `in_proj_*`.

    A projection (SDXL's CLIPTextModelWithProjection) is written as OpenCLIP holds it: `text_projection`,
    [width, embed], the transpose of the Linear weight (diffusers' reader transposes it back).
    """
    out, qkv, left = {}, {}, []
    for key, t in text_sd.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = t.t().contiguous()
            continue
        key = _text_key(key)
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = t
            continue
        m = _LAYER.match(key)
        if not m:
            left.append(key)
            continue
        layer, module, param = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, param), {})[module[-6]] = t
            continue
        if module not in _OPEN_CLIP_LAYER:
            left.append(key)
            continue
        out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = t
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.append(f"encoder.layers.{layer}.self_attn.*_proj.{param}")
            continue
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # [3 * hidden, hidden] or [3 * hidden]
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    _check_leftovers(left, "text encoder")
    return out


def open_clip_extras(text_sd, config):
    """What SD 2.x files hold beyond diffusers' model: OpenCLIP's last block, projection, logit scale.

    SD 2.x uses the penultimate layer, so diffusers drops the last block. Other
    tools expect these keys; without the user's file to keep them from, the
    last block is a copy of the one before (as sd-scripts writes it).
    """
    n = config["num_hidden_layers"]
    hidden = config["hidden_size"]
    src = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n - 1}."
    dst = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n}."
    extras = {dst + k[len(src):]: t.clone() for k, t in text_sd.items() if k.startswith(src)}
    ref = text_sd[OPEN_CLIP_PREFIX + "ln_final.weight"]
    extras[OPEN_CLIP_PREFIX + "text_projection"] = torch.eye(hidden, dtype=ref.dtype)  # [width, embed]
    extras[OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(1.0, dtype=ref.dtype)
    return extras


def text_encoder_to_original(text_sd, version, config):
    if version == "sd1":
        return clip_to_original(text_sd, config)
    return open_clip_to_original(text_sd, config)


def _check_leftovers(left, what):
    if left:
        raise FormatError(
            f"{what}: {len(left)} weights have no place in the original layout (e.g. {', '.join(sorted(left)[:3])})"
        )


def to_original(unet_sd, vae_sd, text_sd, version, configs, text_sd_2=None):
    """The original-layout state dict of three diffusers components (SDXL: four, `text_sd_2` its OpenCLIP bigG).

    Returns (core, extras): `core` holds the converted model weights, `extras`
    the derived keys (CLIP position ids, SD 2.x dropped block / projection)
    that a user's file should supply when it has them. SDXL's `logit_scale`
    (unused for images) is written only from the user's file, as sd-scripts does.
    """
    core = {}
    core.update(unet_to_original(unet_sd, configs["unet"]))
    core.update(vae_to_original(vae_sd, configs["vae"]))
    if version == "sdxl":
        if text_sd_2 is None:
            raise FormatError("an SDXL model needs its second text encoder (text_encoder_2) to be written")
        text = clip_to_original(text_sd, configs["text_encoder"], SDXL_CLIP_PREFIX)
        core.update(open_clip_to_original(text_sd_2, configs["text_encoder_2"], SDXL_OPEN_CLIP_PREFIX))
    else:
        text = text_encoder_to_original(text_sd, version, configs["text_encoder"])
    extras = {}
    if version in ("sd1", "sdxl"):
        key = (SDXL_CLIP_PREFIX if version == "sdxl" else CLIP_PREFIX) + "text_model.embeddings.position_ids"
        extras[key] = text.pop(key)
    else:
        extras = open_clip_extras(text, configs["text_encoder"])
    core.update(text)
    return core, extras
