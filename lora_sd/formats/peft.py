"""PEFT adapter folders: `<out>/unet/`, `<out>/text_encoder/`, each with
`adapter_config.json` and `adapter_model.safetensors` as `PeftModel.save_pretrained` writes
(plus the kohya metadata in the safetensors header, so that kohya -> PEFT -> kohya keeps it).

Every kind: peft_type LORA (DoRA: `use_dora` and `<module>.lora_magnitude_vector`),
LOHA (`<module>.hada_w1_a`, ...) or LOKR (`<module>.lokr_w1`, ...), the names
PEFT's save_pretrained gives them, so PEFT's own loaders read the folders.

`lora_modules` (PEFT-named tensors + a LoraConfig dict -> LoraWeights entries)
also reads diffusers' LoRA files, which use the same names per component.
"""

import json
from pathlib import Path

import safetensors.torch
from peft.utils.other import get_pattern_key

from lora_sd import adapter_math
from lora_sd.errors import FormatError
from lora_sd.formats.metadata import kohya_metadata_only
from lora_sd.io import read_tensor_file
from lora_sd.lora_weights import COMPONENTS, LoraModule, LoraWeights, is_unet_3x3, key_for_module
from lora_sd.peft_bridge import MAGNITUDE, check_peft_reproduces

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
PEFT_KINDS = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}


def lora_modules(component, state, config, source) -> dict[str, LoraModule]:
    """{LoraWeights key: LoraModule} from `<module>.lora_A.weight` / `.lora_B.weight` tensors of one component.

    Alphas come from `config` (a LoraConfig dict: `lora_alpha`, `alpha_pattern`,
    matched as PEFT matches them); none given means alpha = rank. A 0-d
    `<module>[.lora_A.weight].alpha` tensor (diffusers' `network_alphas` names,
    which some tools store in the file) gives that module's alpha.
    """
    pairs, alphas, magnitudes = {}, {}, {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):  # hand-written: diffusers keeps network_alphas in memory, never in its files
            alphas[key.removesuffix(".alpha").split(".lora_")[0]] = tensor
            continue
        if key.endswith("." + MAGNITUDE):  # DoRA's magnitude: [out] (Linear) or [1, out, 1, 1] (conv)
            magnitudes[key.removesuffix("." + MAGNITUDE)] = tensor
            continue
        name, part = key[: -len(LORA_A)], key[-len(LORA_A):]
        if part not in (LORA_A, LORA_B):
            raise FormatError(f"{source}: {component} key {key!r} is not a LoRA tensor (<module>.lora_A/lora_B.weight)")
        pairs.setdefault(name, {})[part] = tensor
    if set(alphas) - set(pairs):
        raise FormatError(f"{source}: alpha {component}.{sorted(set(alphas) - set(pairs))[0]}.alpha has no LoRA module")
    if set(magnitudes) - set(pairs):
        raise FormatError(f"{source}: {component}.{sorted(set(magnitudes) - set(pairs))[0]}.{MAGNITUDE} has no LoRA module")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise FormatError(f"{source}: {component} alpha_pattern is a {type(patterns).__name__}, not a {{module: alpha}} table")
    modules = {}
    for name, p in pairs.items():
        if len(p) != 2:
            raise FormatError(f"{source}: module {component}.{name} has only one of lora_A/lora_B")
        down, up = p[LORA_A], p[LORA_B]
        alpha = patterns.get(get_pattern_key(patterns, name), config.get("lora_alpha", down.shape[0]))
        if name in alphas:
            alpha = alphas[name].float() if alphas[name].numel() == 1 else f"of shape {tuple(alphas[name].shape)}"
        try:  # a number, or a one-element tensor; not a string, None, or a tensor of several values
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise FormatError(f"{source}: module {component}.{name} has an alpha {alpha!r}; an alpha is one number") from None
        dora = magnitudes.get(name)
        if dora is not None:
            if dora.numel() != up.shape[0]:
                raise FormatError(f"{source}: module {component}.{name} has a {MAGNITUDE} of shape "
                                  f"{tuple(dora.shape)}; DoRA's magnitude has one value per output ({up.shape[0]})")
            dora = dora.reshape(up.shape[0], *[1] * (up.dim() - 1))
        modules[key_for_module(component, name)] = LoraModule(down, up, alpha, dora_scale=dora)
    return modules


def lycoris_modules(component, kind, state, config, source) -> dict[str, LoraModule]:
    """{LoraWeights key: LoraModule} from PEFT's LoHa/LoKr tensors (`<module>.hada_w1_a`, `<module>.lokr_w1`, ...).

    PEFT scales a module by alpha / r (config `alpha`, `r`, or their patterns);
    the in-memory module gets the alpha that gives that scale with its tensors'
    rank, and a LoKr with both factors full gets it baked into `lokr_w2`.
    """
    groups = {}
    for key, tensor in state.items():
        name, _, tname = key.rpartition(".")
        if tname not in adapter_math.TENSOR_NAMES[kind]:
            raise FormatError(f"{source}: {component} key {key!r} is not a PEFT {kind.upper()} tensor "
                              f"(<module>.{'/'.join(adapter_math.TENSOR_NAMES[kind])})")
        groups.setdefault(name, {})[tname] = tensor
    modules = {}
    for name, tensors in groups.items():
        where = f"{source}: module {component}.{name}"
        r, alpha = (_pattern_value(config, name, *keys, where) for keys in (("rank_pattern", "r"), ("alpha_pattern", "alpha")))
        m = LoraModule.of_kind(kind, tensors, 1.0)
        try:
            shape = _lycoris_shape(component, name, m.weight_shape())
        except (RuntimeError, KeyError) as e:
            raise FormatError(f"{where}: its {kind} tensors do not make a weight ({e})") from None
        if m.rank is None:  # LoKr without a decomposed factor: PEFT's alpha / r, baked in (FORMATS.md)
            tensors = {**tensors, "lokr_w2": tensors["lokr_w2"] * (alpha / r)}
            alpha = 1.0
        elif m.rank != r:
            alpha = alpha / r * m.rank
        modules[key_for_module(component, name)] = LoraModule.of_kind(kind, tensors, alpha, shape=shape)
    return modules


def _pattern_value(config, name, pattern_key, key, where) -> float:
    """A module's value from a PEFT config: its `rank_pattern`/`alpha_pattern` entry (matched as PEFT does) or
    the config's `r`/`alpha`."""
    patterns = config.get(pattern_key) or {}
    if not isinstance(patterns, dict):
        raise FormatError(f"{where}: {pattern_key} is a {type(patterns).__name__}, not a {{module: value}} table")
    value = patterns.get(get_pattern_key(patterns, name), config.get(key, 8))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise FormatError(f"{where}: {key} {value!r} in the adapter config; it is one positive number")
    return value


def _lycoris_shape(component, name, flat_shape) -> tuple:
    """The weight shape of a LoHa/LoKr module: what its delta says, and for a U-Net 3x3 conv (its tensors keep
    it flattened, [out, in*9]) the 4-D shape, as the contract for LyCORIS files says."""
    if is_unet_3x3(f"{component}.{name}") and len(flat_shape) == 2 and flat_shape[1] % 9 == 0:
        return (flat_shape[0], flat_shape[1] // 9, 3, 3)
    return tuple(flat_shape)


def is_peft_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def read_peft_folder(path) -> LoraWeights:
    path = Path(path)
    lora = LoraWeights()
    for component in COMPONENTS:
        folder = path / component
        if not (folder / CONFIG_NAME).is_file():
            if any((folder / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")):
                # adapter weights without a readable config: skipping them would drop a whole component
                raise FormatError(f"{folder}: has adapter files but no readable {CONFIG_NAME} file")
            continue
        try:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{folder / CONFIG_NAME}: not a readable adapter config ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{folder / CONFIG_NAME}: holds a JSON {type(cfg).__name__}, not an adapter config object")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            weights = folder / "adapter_model.bin"
        state, metadata = read_tensor_file(weights)
        state = {k.removeprefix(_PREFIX): t for k, t in state.items()}
        kind = PEFT_KINDS.get(cfg.get("peft_type", "LORA"))
        if kind is None:
            raise FormatError(f"{folder / CONFIG_NAME}: peft_type {cfg.get('peft_type')!r} is not one of "
                              f"{', '.join(PEFT_KINDS)}")
        if kind == "lora":
            lora.modules.update(lora_modules(component, state, cfg, weights))
        else:
            lora.modules.update(lycoris_modules(component, kind, state, cfg, weights))
        lora.metadata.update(kohya_metadata_only(metadata))  # written into each adapter file: see write_peft_folder
    if not lora.modules:
        raise FormatError(f"{path}: no PEFT adapter (expected unet/ or text_encoder/ with {CONFIG_NAME})")
    return lora


def write_peft_folder(lora: LoraWeights, folder):
    """Write the adapter folders into `folder` (which must exist and be empty); tensors as they are in `lora`.

    FormatError naming the module, before anything is written, where PEFT's
    config cannot reproduce a module's tensors (LoKr factors split another way)
    or PEFT has no adapter for it (DoRA per input column, LoHa/LoKr with DoRA).
    """
    folder = Path(folder)
    configs = {c: lora.peft_config(c) for c in lora.components}
    for component, config in configs.items():
        check_peft_reproduces(lora, component, config)
    for component, config in configs.items():
        sub = folder / component
        sub.mkdir(parents=True)
        config.save_pretrained(str(sub))
        state = {_PREFIX + k: t for k, t in lora.peft_state_dict(component).items()}
        # the kohya training metadata (ss_*, modelspec.*) rides in each adapter file's header, where PEFT
        # ignores it and where it stays with the weights when one adapter folder is copied alone
        metadata = {"format": "pt", **kohya_metadata_only(lora.metadata)}
        safetensors.torch.save_file(state, str(sub / WEIGHTS_NAME), metadata=metadata)
