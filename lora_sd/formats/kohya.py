"""The kohya single-file format (what sd-scripts, AUTOMATIC1111 and ComfyUI read).

Keys: `<kohya name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d).
diffusers' `convert_state_dict_to_kohya` is not used for writing: it writes
alpha = rank (the real alpha is lost) and misnames text-encoder keys.

SDXL files use sd-scripts' SDXL names: `lora_te1_`/`lora_te2_` and the U-Net
in the original layout (`lora_unet_input_blocks_4_1_...`); diffusers-named
SDXL files (`lora_unet_down_blocks_...` with `lora_te1_`/`lora_te2_`, which
some tools write) are read too. LoraWeights keys stay diffusers paths. The
U-Net name map needs the U-Net's layout: pass `unet_config` (the model's
`unet.config`) when it is known; without it SDXL base's layout is assumed,
which is also the tiny SDXL's (see `lora_sd.formats.sdxl_names`).
"""

import torch

from lora_sd.errors import FormatError
from lora_sd.formats.base_model import lora_base, note_sdxl
from lora_sd.formats.metadata import modelspec_metadata, network_metadata, version_metadata, with_hashes
from lora_sd.formats.names import KOHYA_PREFIXES, key_from_kohya, kohya_name
from lora_sd.lora_weights import LoraModule, LoraWeights

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_SGM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def is_kohya(state_dict) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) and k.endswith(_SUFFIXES) for k in state_dict)


def lora_from_kohya(state_dict, metadata=None, source="", unet_config=None) -> LoraWeights:
    """Read a kohya state dict. A missing `.alpha` means alpha = rank.

    Every key must end up in a module (the leftover-key check: FormatError naming the
    first key that does not); two names of one module (SDXL's original and diffusers
    names mixed) are refused. An SDXL file without base-model metadata gets it.
    """
    parts = {}
    for key, tensor in state_dict.items():
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix] = tensor
                break
        else:
            raise FormatError(f"{source}: key {key!r} is not a kohya LoRA tensor (lora_down/lora_up/alpha)")
    lora = LoraWeights(metadata=dict(metadata or {}))
    for name, p in parts.items():
        if ".lora_down.weight" not in p or ".lora_up.weight" not in p:
            raise FormatError(f"{source}: module {name} has no {'lora_down' if '.lora_up.weight' in p else 'lora_up'} weight")
        down, up = p[".lora_down.weight"], p[".lora_up.weight"]
        if ".alpha" in p and p[".alpha"].numel() != 1:
            raise FormatError(f"{source}: {name}.alpha has shape {tuple(p['.alpha'].shape)}; an alpha is one number")
        alpha = float(p[".alpha"].float().item()) if ".alpha" in p else float(down.shape[0])
        key = key_from_kohya(name, source, unet_config)
        if key in lora.modules:  # lora_te_ and lora_te1_, or original-layout and diffusers U-Net names, mixed
            raise FormatError(f"{source}: key {name} names module {key} a second time (two names for one module: "
                              "lora_te_ and lora_te1_, or original-layout and diffusers U-Net names?); keep one of them")
        lora.modules[key] = LoraModule(down, up, alpha)
    sdxl_names = [n for n in parts if n.startswith(("lora_te1_", "lora_te2_", *_SGM_PREFIXES))]
    if sdxl_names:
        note_sdxl(lora, source, f"its module names ({sdxl_names[0]})")
    return lora


def file_version(lora: LoraWeights, version="sd1") -> str:
    """The base model a kohya file is written for: SDXL when the LoRA says so (metadata or modules)."""
    return "sdxl" if lora_base(lora) == "sdxl" else version


def kohya_state_dict(lora: LoraWeights, version="sd1", unet_config=None) -> dict[str, torch.Tensor]:
    """The file's tensors; alphas in the LoRA's dtype, as sd-scripts saves its alpha buffer.

    SDXL (`version` "sdxl", or the LoRA says so) gets sd-scripts' SDXL names, the U-Net mapped with
    `unet_config`'s layout (SDXL base's when None).
    """
    sdxl = file_version(lora, version) == "sdxl"
    state = {}
    for key, m in lora.modules.items():
        name = kohya_name(key, sdxl, unet_config)
        state[f"{name}.lora_down.weight"] = m.down
        state[f"{name}.lora_up.weight"] = m.up
        state[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=m.down.dtype)
    return state


def kohya_metadata(lora: LoraWeights, version="sd1", v_parameterization=False, title=None) -> dict[str, str]:
    """The metadata a kohya file gets: the LoRA's own, with the network keys filled in."""
    meta = dict(lora.metadata)
    version = file_version(lora, version)
    linear = [m for m in lora.modules.values() if not m.is_3x3]  # Linear and 1x1 convs: network_dim
    conv = [m for m in lora.modules.values() if m.is_3x3]  # 3x3 convs: conv_dim
    network = network_metadata(max(m.rank for m in linear or conv), (linear or conv)[0].alpha,
                               conv[0].rank if conv else None, conv[0].alpha if conv else None)
    for k, v in {**network, **version_metadata(version), **modelspec_metadata(version, v_parameterization, title)}.items():
        meta.setdefault(k, v)
    return meta


def kohya_file_contents(lora, version="sd1", unet_config=None, **meta_kwargs):
    """(tensors, metadata with sshs hashes) of the kohya file for this LoRA (tensors as they are in `lora`)."""
    state = kohya_state_dict(lora, version, unet_config)
    return state, with_hashes(state, kohya_metadata(lora, version, **meta_kwargs))
