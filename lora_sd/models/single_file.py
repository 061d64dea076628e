"""Original Stable Diffusion layout -> diffusers components, with diffusers' own converters.

An original-layout file holds `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE) and `cond_stage_model.*` (text encoder: OpenAI
CLIP under `transformer.text_model.` in SD 1.x, OpenCLIP under `model.` in
SD 2.x). SDXL files (Stability's SGM layout) hold the two text encoders under
`conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG). This module says what a
file is (or why it is not a base model) and converts it with
`diffusers.loaders.single_file_utils`; the way back is `original_layout.py`.
"""

import logging
import re
from types import SimpleNamespace

import torch

from ..errors import FormatError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: + text_model.*
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L: + text_model.*
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG
VERSION_NAMES = {
    "sd1": "SD 1.x (OpenAI CLIP text encoder)", "sd2": "SD 2.x (OpenCLIP text encoder)",
    "sdxl": "SDXL (CLIP ViT-L and OpenCLIP bigG text encoders)",
}


def _has(keys, prefix):
    return any(k.startswith(prefix) for k in keys)


def _sdxl_text_encoders(keys, path):
    """An SGM-layout file (`conditioner.embedders.*`) is SDXL base when it has both of base's text encoders."""
    has_clip, has_open_clip = _has(keys, SDXL_CLIP_PREFIX + "text_model."), _has(keys, SDXL_OPEN_CLIP_PREFIX)
    if has_clip and has_open_clip:
        return "sdxl"
    if _has(keys, "conditioner.embedders.0.model."):  # the refiner has only bigG, as embedder 0
        raise FormatError(f"{path}: this is an SDXL refiner (one OpenCLIP text encoder); only SDXL base models "
                          "and their fine-tunes are supported")
    missing = SDXL_OPEN_CLIP_PREFIX if has_clip else SDXL_CLIP_PREFIX + "text_model."
    raise FormatError(f"{path}: an SDXL checkpoint without its {missing}* text-encoder weights; "
                      "a full SDXL checkpoint is needed")


def detect_version(state_dict, path):
    """'sd1', 'sd2' or 'sdxl' for an original-layout SD checkpoint; FormatError naming the file otherwise."""
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise FormatError(f"{path}: this is a LoRA file, not a base model (pass it as network_weights)")
    has_unet, has_vae = _has(keys, UNET_PREFIX), _has(keys, VAE_PREFIX)
    if has_unet and not _has(keys, UNET_PREFIX + "input_blocks."):
        # SD3 (joint_blocks), Flux (double_blocks), ... also keep their denoiser under this prefix
        example = next(k for k in keys if k.startswith(UNET_PREFIX))
        raise FormatError(f"{path}: not a Stable Diffusion 1.x, 2.x or XL checkpoint: its {UNET_PREFIX}* keys "
                          f"are another architecture's (e.g. {example})")
    if not has_unet:
        if has_vae or _has(keys, "encoder.conv_in.") or _has(keys, "decoder.conv_in."):
            raise FormatError(f"{path}: this looks like a VAE only, not a full Stable Diffusion checkpoint")
        if _has(keys, "down_blocks.") or _has(keys, "unet."):
            raise FormatError(
                f"{path}: keys are in diffusers layout, not the original single-file layout; pass the diffusers folder"
            )
        raise FormatError(f"{path}: not a Stable Diffusion 1.x, 2.x or XL checkpoint (no {UNET_PREFIX}* keys)")
    if not has_vae:
        raise FormatError(f"{path}: has no VAE weights ({VAE_PREFIX}*); a full SD checkpoint is needed")
    if _has(keys, "conditioner.embedders."):
        return _sdxl_text_encoders(keys, path)
    if _has(keys, OPEN_CLIP_PREFIX + "transformer.resblocks."):
        return "sd2"
    if _has(keys, CLIP_PREFIX + "text_model."):
        return "sd1"
    raise FormatError(f"{path}: has no text encoder weights (cond_stage_model.*); a full SD checkpoint is needed")


def check_version(detected, v2, path):
    """A `--v2` that contradicts the file is an error saying what the file looks like."""
    if v2 and detected != "sd2":
        raise FormatError(f"{path}: --v2 was given but the file looks like {VERSION_NAMES[detected]}; drop --v2")
    if v2 is False and detected == "sd2":
        # kohya's default is v2=False meaning "not given": detect instead of failing on shapes.
        logger.info("%s: detected %s (v2 not given; 768-v models also need v_parameterization)",
                    path, VERSION_NAMES[detected])


def adapt_unet_config(unet_config, state_dict):
    """Take what the weights say over a shipped config: input channels (inpainting has 9)."""
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4:
        unet_config = dict(unet_config, in_channels=int(conv_in.shape[1]))
    return unet_config


def _strip_text_model(sd):
    # transformers 5 flattened CLIPTextModel: its module names no longer start with `text_model.`.
    out = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out.pop("embeddings.position_ids", None)  # a non-persistent buffer now
    return out


def convert_text_encoder(state_dict, version, text_config):
    """Text-encoder weights in transformers' CLIPTextModel names."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if version == "sd1":
        return _strip_text_model(convert_ldm_clip_checkpoint(state_dict))
    # SD 2.x: drop OpenCLIP blocks the diffusers model does not have (the last one) and the projection
    # (the converter's own ignore list assumes 24 blocks) so that in_proj splits at hidden_size.
    layers = text_config["num_hidden_layers"]
    pattern = re.compile(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    kept = {}
    for k, v in state_dict.items():
        if not k.startswith(OPEN_CLIP_PREFIX) or k == OPEN_CLIP_PREFIX + "text_projection":
            continue
        m = pattern.match(k)
        if m and int(m.group(1)) >= layers:
            continue
        kept[k] = v
    shim = SimpleNamespace(config=SimpleNamespace(hidden_size=text_config["hidden_size"]))
    return _strip_text_model(convert_open_clip_checkpoint(shim, kept, prefix=OPEN_CLIP_PREFIX))


def convert_text_encoder_2(state_dict, text_config):
    """SDXL's OpenCLIP bigG -> CLIPTextModelWithProjection names (`text_model.*`, `text_projection.weight`).

    diffusers' converter splits the fused q/k/v and transposes `text_projection` (OpenCLIP multiplies
    `x @ text_projection`, a Linear holds the transpose); `logit_scale` has no place in the text model.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    kept = {k: v for k, v in state_dict.items() if k.startswith(SDXL_OPEN_CLIP_PREFIX)}
    shim = SimpleNamespace(config=SimpleNamespace(hidden_size=text_config["hidden_size"]))
    converted = convert_open_clip_checkpoint(shim, kept, prefix=SDXL_OPEN_CLIP_PREFIX)
    converted.pop("text_model.embeddings.position_ids", None)
    return converted


def convert_to_diffusers(state_dict, version, configs):
    """{'unet', 'vae', 'text_encoder'} (+ SDXL's 'text_encoder_2'): diffusers / transformers state dicts
    of an original-layout file."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    vae_sd = {k: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    out = {
        "unet": convert_ldm_unet_checkpoint(state_dict, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(vae_sd, configs["vae"]),
        # SDXL's first encoder converts as SD 1.x's: diffusers strips either prefix
        "text_encoder": convert_text_encoder(state_dict, "sd1" if version == "sdxl" else version,
                                             configs["text_encoder"]),
    }
    if version == "sdxl":
        out["text_encoder_2"] = convert_text_encoder_2(state_dict, configs["text_encoder_2"])
    return out


def _fit_text_model_level(sd, model):
    """Add or drop the `text_model.` level to match the model (transformers 5 flattened CLIPTextModel only)."""
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for k, v in sd.items():
        bare = k.removeprefix("text_model.")
        inner = not k.startswith("text_projection.")
        out["text_model." + bare if wrapped and inner else bare if inner else k] = v
    return out


def _load_into(model, sd, name, path, dtype):
    """Strict load (assign: no second copy of the weights); mismatches name the file and keys."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} of other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(want[k].shape)})")
        raise FormatError(
            f"{path}: {name} weights do not fit the {name} config (another size? pass model_config): " + "; ".join(parts)
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def empty_components(configs):
    """(unet, vae, text_encoder) built from configs on the meta device: no memory, no weights yet.

    With a 'text_encoder_2' config (SDXL) a fourth: a CLIPTextModelWithProjection.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        parts = (
            UNet2DConditionModel.from_config(configs["unet"]),
            AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        )
        if "text_encoder_2" in configs:
            parts += (CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),)
    return parts


_COMPONENT_NAMES = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}


def build_components(state_dict, version, configs, path, torch_dtype=None):
    """(unet, vae, text_encoder[, text_encoder_2]) built from configs and filled from an original-layout state dict."""
    dtype = torch_dtype or torch.float32
    converted = convert_to_diffusers(state_dict, version, configs)
    models = empty_components(configs)
    if "text_encoder_2" in converted:
        converted["text_encoder_2"] = _fit_text_model_level(converted["text_encoder_2"], models[3])
    return tuple(_load_into(model, converted[name], _COMPONENT_NAMES[name], path, dtype)
                 for name, model in zip(_COMPONENT_NAMES, models))
