"""The kohya single-file format (what sd-scripts, AUTOMATIC1111 and ComfyUI read).

Keys: `<kohya name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d).
diffusers' `convert_state_dict_to_kohya` is not used for writing: it writes
alpha = rank (the real alpha is lost) and misnames text-encoder keys.
"""

import torch

from lora_sd.errors import FormatError
from lora_sd.formats.metadata import modelspec_metadata, network_metadata, version_metadata, with_hashes
from lora_sd.formats.names import KOHYA_PREFIXES, key_from_kohya, kohya_name
from lora_sd.lora_weights import LoraModule, LoraWeights

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def is_kohya(state_dict) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) and k.endswith(_SUFFIXES) for k in state_dict)


def lora_from_kohya(state_dict, metadata=None, source="") -> LoraWeights:
    """Read a kohya state dict. A missing `.alpha` means alpha = rank."""
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
        key = key_from_kohya(name, source)
        if key in lora.modules:  # lora_te_ and lora_te1_ both name the first text encoder: one would be dropped
            raise FormatError(f"{source}: two modules of the file are both {key} (one is {name}); keep one of them")
        lora.modules[key] = LoraModule(down, up, alpha)
    return lora


def kohya_state_dict(lora: LoraWeights, version="sd1") -> dict[str, torch.Tensor]:
    """The file's tensors; alphas in the LoRA's dtype, as sd-scripts saves its alpha buffer."""
    sdxl = version == "sdxl" or "text_encoder_2" in lora.components
    state = {}
    for key, m in lora.modules.items():
        name = kohya_name(key, sdxl)
        state[f"{name}.lora_down.weight"] = m.down
        state[f"{name}.lora_up.weight"] = m.up
        state[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=m.down.dtype)
    return state


def kohya_metadata(lora: LoraWeights, version="sd1", v_parameterization=False, title=None) -> dict[str, str]:
    """The metadata a kohya file gets: the LoRA's own, with the network keys filled in."""
    meta = dict(lora.metadata)
    linear = [m for m in lora.modules.values() if not m.is_3x3]  # Linear and 1x1 convs: network_dim
    conv = [m for m in lora.modules.values() if m.is_3x3]  # 3x3 convs: conv_dim
    network = network_metadata(max(m.rank for m in linear or conv), (linear or conv)[0].alpha,
                               conv[0].rank if conv else None, conv[0].alpha if conv else None)
    for k, v in {**network, **version_metadata(version), **modelspec_metadata(version, v_parameterization, title)}.items():
        meta.setdefault(k, v)
    return meta


def kohya_file_contents(lora, version="sd1", **meta_kwargs):
    """(tensors, metadata with sshs hashes) of the kohya file for this LoRA (tensors as they are in `lora`)."""
    state = kohya_state_dict(lora, version)
    return state, with_hashes(state, kohya_metadata(lora, version, **meta_kwargs))
