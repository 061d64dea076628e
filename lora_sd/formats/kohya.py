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

import json
from collections import Counter

import torch

from lora_sd import adapter_math
from lora_sd.adapter_math import DORA_SCALE, LOHA_TENSORS, LOKR_TENSORS, LORA_TENSORS, kind_of
from lora_sd.errors import FormatError
from lora_sd.formats.checks import delta_shape, structure_problem
from lora_sd.formats.base_model import lora_base, note_sdxl
from lora_sd.formats.metadata import modelspec_metadata, network_metadata, version_metadata, with_hashes
from lora_sd.formats.names import KOHYA_PREFIXES, key_from_kohya, kohya_name
from lora_sd.lora_weights import LoraModule, LoraWeights, is_unet_3x3

_PARTS = {*LORA_TENSORS, *LOHA_TENSORS, *LOKR_TENSORS, "alpha", DORA_SCALE}
_SGM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def is_kohya(state_dict) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) and k.partition(".")[2] in _PARTS for k in state_dict)


def lora_from_kohya(state_dict, metadata=None, source="", unet_config=None) -> LoraWeights:
    """Read a kohya state dict: plain LoRA (DoRA with `dora_scale`), LyCORIS' LoCon, LoHa and LoKr.

    Missing alpha: LoRA/LoHa alpha = rank (scale 1), LoKr alpha = the decomposed factor's rank (scale 1;
    unused when both factors are full). Every key must end up in a module (the leftover-key check:
    FormatError naming the first key that does not); a module mixing kinds or missing a factor is
    refused; two names of one module (SDXL's original and diffusers names mixed) are refused. An SDXL
    file without base-model metadata gets it. The shapes are checked by `read_lora`.
    """
    parts = {}
    for key, tensor in state_dict.items():
        name, _, part = key.partition(".")
        if part == "lora_mid.weight":  # LoCon's Tucker core: folded into a 3x3 down below
            parts.setdefault(name, {})[part] = tensor
        elif part in _PARTS:
            parts.setdefault(name, {})[part] = tensor
        else:
            raise FormatError(f"{source}: key {key!r} is not a tensor of a kind lora-sd reads (lora_down/lora_up/"
                              "alpha, LoHa hada_*, LoKr lokr_*, dora_scale; LyCORIS' IA3, OFT, GLoRA, full and norm "
                              "modules are not supported)")
    lora = LoraWeights(metadata=dict(metadata or {}))
    for name, p in parts.items():
        key = key_from_kohya(name, source, unet_config)
        if key in lora.modules:  # lora_te_ and lora_te1_, or original-layout and diffusers U-Net names, mixed
            raise FormatError(f"{source}: key {name} names module {key} a second time (two names for one module: "
                              "lora_te_ and lora_te1_, or original-layout and diffusers U-Net names?); keep one of them")
        lora.modules[key] = _module(name, key, p, source)
    sdxl_names = [n for n in parts if n.startswith(("lora_te1_", "lora_te2_", *_SGM_PREFIXES))]
    if sdxl_names:
        note_sdxl(lora, source, f"its module names ({sdxl_names[0]})")
    return lora


def _module(name, key, p, source) -> LoraModule:
    """One module from its file tensors {part: tensor}."""
    p = dict(p)
    alpha, dora = p.pop("alpha", None), p.pop(DORA_SCALE, None)
    if alpha is not None and alpha.numel() != 1:
        raise FormatError(f"{source}: {name}.alpha has shape {tuple(alpha.shape)}; an alpha is one number")
    if "lora_mid.weight" in p:
        p = _fold_locon_tucker(name, p, source)
    kind = kind_of(p)
    if kind is None:
        raise FormatError(f"{source}: module {name} mixes tensors of several kinds ({', '.join(sorted(p))}); "
                          "a module is one of LoRA (lora_down/lora_up), LoHa (hada_*) or LoKr (lokr_*)")
    problem = structure_problem(kind, p)
    if problem:
        raise FormatError(f"{source}: module {name} {problem}")
    rank = adapter_math.kind_rank(kind, p)
    alpha = float(alpha.float().item()) if alpha is not None else float(rank or 1)
    shape = None
    if kind != "lora" and is_unet_3x3(key):
        try:
            flat = delta_shape(kind, p)
        except ValueError as e:
            raise FormatError(f"{source}: module {name} {e}") from None
        if len(flat) == 2:
            if flat[1] % 9:
                raise FormatError(f"{source}: module {name} has factors composing to {flat}, which is no 3x3 conv "
                                  "weight (in_channels * 9 columns)")
            flat = (flat[0], flat[1] // 9, 3, 3)
        shape = tuple(flat)
    return LoraModule.of_kind(kind, p, alpha, dora, shape)


def _fold_locon_tucker(name, p, source):
    """LoCon with use_tucker (down [r, in, 1, 1], mid [r, r, k, k], up [out, r, 1, 1]) as the plain 3x3 LoRA of the
    same delta and rank: down3x3[m, j] = sum_n mid[m, n] down[n, j] (ComfyUI's tucker_weight_from_conv)."""
    mid, down = p.pop("lora_mid.weight"), p.get("lora_down.weight")
    if down is None or mid.dim() != 4 or down.shape[0] != mid.shape[1]:
        raise FormatError(f"{source}: module {name} has lora_mid.weight {tuple(mid.shape)} without a lora_down of "
                          f"rank {mid.shape[1] if mid.dim() == 4 else '?'}")
    p["lora_down.weight"] = torch.einsum("m n k l, n j -> m j k l", mid.float(), down.flatten(1).float()).to(down.dtype)
    return p


def file_version(lora: LoraWeights, version="sd1") -> str:
    """The base model a kohya file is written for: SDXL when the LoRA says so (metadata or modules)."""
    return "sdxl" if lora_base(lora) == "sdxl" else version


def kohya_state_dict(lora: LoraWeights, version="sd1", unet_config=None) -> dict[str, torch.Tensor]:
    """The file's tensors under LyCORIS' names per kind; alphas in the LoRA's dtype, as sd-scripts saves its
    alpha buffer; DoRA's `dora_scale` per output row as [out, 1] / [out, 1, 1, 1] (LyCORIS' wd_on_output).

    SDXL (`version` "sdxl", or the LoRA says so) gets sd-scripts' SDXL names, the U-Net mapped with
    `unet_config`'s layout (SDXL base's when None).
    """
    sdxl = file_version(lora, version) == "sdxl"
    state = {}
    for key, m in lora.modules.items():
        name = kohya_name(key, sdxl, unet_config)
        tensors = m.named_tensors()
        for part, t in tensors.items():
            state[f"{name}.{part}"] = t
        state[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=next(iter(tensors.values())).dtype)
        if m.dora_scale is not None:
            state[f"{name}.{DORA_SCALE}"] = _dora_for_file(m)
    return state


def _dora_for_file(m: LoraModule):
    """PEFT's magnitude [out] as LyCORIS writes it, [out, 1] or [out, 1, 1, 1]; an input-axis [1, in, ...] one
    (read from a file) as it was."""
    dims = len(m.weight_shape())
    if m.dora_scale.dim() == dims:
        return m.dora_scale
    return m.dora_scale.reshape(-1, *[1] * (dims - 1))


def network_keys(lora: LoraWeights) -> dict[str, str]:
    """sd-scripts' `ss_network_*` keys for these modules: networks.lora for plain LoRAs, lycoris.kohya with
    `algo` (and DoRA's dora_wd / wd_on_output) in ss_network_args for LoHa, LoKr and DoRA."""
    mods = list(lora.modules.values())
    linear = [m for m in mods if not m.is_3x3]  # Linear and 1x1 convs: network_dim
    conv = [m for m in mods if m.is_3x3]  # 3x3 convs: conv_dim
    main = linear or conv
    dim = max((m.rank for m in main if m.rank is not None), default=1)  # a LoKr of full factors has no rank
    conv_dim = next((m.rank for m in conv if m.rank is not None), 1) if conv else None
    conv_alpha = conv[0].alpha if conv else None
    kinds = Counter(m.kind for m in mods if m.kind != "lora")
    dora = [m for m in mods if m.dora_scale is not None]
    if not kinds and not dora:
        return network_metadata(dim, main[0].alpha, conv_dim, conv_alpha)
    algo = kinds.most_common(1)[0][0] if kinds else "locon" if conv else "lora"
    args = {"algo": algo}
    if any("lokr_w1_a" in m.tensors for m in mods):
        args["decompose_both"] = "True"
    if any("hada_t1" in m.tensors or "lokr_t2" in m.tensors for m in mods):
        args["use_tucker"] = "True"
    if dora:
        out_axis = all(adapter_math.dora_axis(m.dora_scale, m.weight_shape()) == "output" for m in dora)
        args.update(dora_wd="True", wd_on_output=str(out_axis))
    return network_metadata(dim, main[0].alpha, conv_dim, conv_alpha, module="lycoris.kohya", args=args)


def kohya_metadata(lora: LoraWeights, version="sd1", v_parameterization=False, title=None) -> dict[str, str]:
    """The metadata a kohya file gets: the LoRA's own, with the network keys filled in.

    The LoRA's own network keys are kept unless they name the other module family (networks.lora for a
    LoHa, or lycoris.kohya with a LoHa/LoKr/DoRA algo for a plain LoRA, e.g. after an SVD merge): then they
    are replaced, so that sd-scripts rebuilds the network the file holds.
    """
    meta = dict(lora.metadata)
    version = file_version(lora, version)
    network = network_keys(lora)
    if _family(meta) not in (None, _family(network)):
        for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args"):
            meta.pop(k, None)
    for k, v in {**network, **version_metadata(version), **modelspec_metadata(version, v_parameterization, title)}.items():
        meta.setdefault(k, v)
    return meta


def _family(meta) -> str | None:
    """'lora' or 'lycoris' (LoHa/LoKr/DoRA) from ss_network_* keys; None when they do not say."""
    module = meta.get("ss_network_module")
    if module is None:
        return None
    if module != "lycoris.kohya":
        return "lora"
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    plain = args.get("algo", "lora") in ("lora", "locon") and str(args.get("dora_wd", "False")).lower() != "true"
    return "lora" if plain else "lycoris"


def kohya_file_contents(lora, version="sd1", unet_config=None, **meta_kwargs):
    """(tensors, metadata with sshs hashes) of the kohya file for this LoRA (tensors as they are in `lora`)."""
    state = kohya_state_dict(lora, version, unet_config)
    return state, with_hashes(state, kohya_metadata(lora, version, **meta_kwargs))
