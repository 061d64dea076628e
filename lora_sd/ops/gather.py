"""Several LoRAs read for one merge: their names, checks, and their modules gathered per key.

Every kind (LoRA, LoHa, LoKr, DoRA) goes through here: shapes come from `fit`, never from a
plain LoRA's `down` / `up`.
"""

import logging
from dataclasses import dataclass

import torch

from lora_sd.errors import ConfigError, ModelMismatchError
from lora_sd.formats import load_lora
from lora_sd.formats.base_model import BASE_NAMES, lora_base, same_base
from lora_sd.lora_weights import LoraModule, LoraWeights
from lora_sd.ops.args import check_pairs
from lora_sd.ops.fit import delta_shape, describe, flat, shapes_agree, tells_kernel, weight_shape
from lora_sd.ops.lowrank import to_lora_shapes

logger = logging.getLogger(__name__)


def lora_names(loras, names=None) -> list[str]:
    """The names messages use for `loras`: the given ones (file paths) or "LoRA #1", "LoRA #2", ..."""
    if not names:
        return [f"LoRA #{i + 1}" for i in range(len(loras))]
    check_pairs(names, loras, "names", "LoRA")
    return list(names)


def checked_pairs(loras, ratios, names, option="ratios"):
    """(ratios, names) for `loras`, one each (ConfigError naming the counts otherwise)."""
    check_pairs(ratios, loras, option, "LoRA")
    return list(ratios), lora_names(loras, names)


def load_loras(paths) -> tuple[list[LoraWeights], list[str]]:
    """(the LoRA files read, their paths as names for messages). Modules that change nothing are reported."""
    loras = [load_lora(p) for p in paths]
    for lora, path in zip(loras, paths, strict=True):
        _report_idle_modules(lora, path)
    return loras, [str(p) for p in paths]


def _report_idle_modules(lora: LoraWeights, name):
    """A warning for modules whose delta is zero (scale 0 from alpha 0, or an all-zero factor: an untrained or
    broken LoRA): merged or applied they do nothing, which would otherwise pass without a word. DoRA modules
    are left out: their magnitude changes the weight even with a zero delta."""
    plain = {k: m for k, m in lora.modules.items() if m.dora_scale is None}
    alpha0 = [k for k, m in plain.items() if m.scale == 0]
    zero = [k for k, m in plain.items() if m.scale != 0 and any(not t.any() for t in m.named_tensors().values())]
    for keys, why in ((alpha0, "alpha 0: scale alpha / rank = 0, as in sd-scripts' merge, ComfyUI and "
                       "AUTOMATIC1111"), (zero, "an all-zero factor, e.g. all-zero up weights (untrained?)")):
        if keys:
            logger.warning("%s: %d of %d module(s) change nothing (%s), e.g. %s",
                           name, len(keys), len(lora.modules), why, keys[0])


def common_version(loras, names) -> str | None:
    """The base-model version all LoRAs agree on ('sd1', 'sd2', 'sdxl'; None if none says); ConfigError
    naming two files if they differ. A LoRA without metadata counts by its module names (`lora_base`)."""
    seen = {}
    for lora, name in zip(loras, names, strict=True):
        version = lora_base(lora)
        if version is not None:
            seen.setdefault(version, name)
    for (v1, n1) in seen.items():
        for (v2, n2) in seen.items():
            if not same_base(v1, v2):
                raise ConfigError(f"{n1} is a LoRA for {BASE_NAMES[v1]} but {n2} is for {BASE_NAMES[v2]}: "
                                  "LoRAs for different base models cannot be merged")
    return next((v for v in seen if v != "sd"), None)


def first_module(loras, names, pick):
    """(name, key, module) of the first module for which `pick(module)` holds, or None."""
    for lora, name in zip(loras, names, strict=True):
        for key, m in lora.modules.items():
            if pick(m):
                return name, key, m
    return None


@dataclass
class ModuleParts:
    """One module as found in several LoRAs: [(ratio, module, file name)], their shapes checked to agree.

    `shape` is the adapted weight's shape (kernel included) as the first LoRA that tells it has it (`known`),
    else as flattened LoHa/LoKr tensors give it; None for a 3x3 conv stored flattened ([out, in*k*k]) in every
    LoRA without a `shape`.
    """

    key: str
    parts: list
    shape: tuple | None
    known: bool = False

    @property
    def all_lora(self) -> bool:
        """Whether every part is a plain LoRA (no LoHa, LoKr or DoRA)."""
        return all(m.kind == "lora" and m.dora_scale is None for _, m, _ in self.parts)

    def downs(self, dtype=torch.float32):
        return [m.down.to(dtype).flatten(1) for _, m, _ in self.parts]  # [rank_i, in*k*k]

    def scaled_ups(self, dtype=torch.float32):
        return [m.up.to(dtype).flatten(1) * (r * m.scale) for r, m, _ in self.parts]  # [out, rank_i]

    def as_module(self, up_2d, down_2d, alpha) -> LoraModule:
        """A plain LoRA module from 2-D factors, shaped for this module's weight (convs: 4-D)."""
        down, up = to_lora_shapes(up_2d, down_2d, self.shape)
        return LoraModule(down, up, float(alpha))


def gather_modules(loras, ratios, names) -> list[ModuleParts]:
    """Every module key of the LoRAs, in order of first appearance, with the LoRAs that have it.

    Shapes are checked across LoRAs of any kinds (a 1x1 conv and a Linear of
    the same size agree, as SD 2 files have either; a flattened LoHa/LoKr conv
    agrees with the 4-D module of the same size); a mismatch is a ConfigError
    naming the module and both files. Modules or components found in only
    some LoRAs are reported.
    """
    ratios, names = checked_pairs(loras, ratios, names)
    gathered: dict[str, ModuleParts] = {}
    flats = {}
    for lora, ratio, name in zip(loras, ratios, names, strict=True):
        for key, m in lora.modules.items():
            try:
                shape, flat_shape = weight_shape(m, key), flat(delta_shape(m, key))
            except ModelMismatchError as e:
                raise ConfigError(f"{name}: {e}") from None
            known = tells_kernel(m, shape)
            entry = gathered.get(key)
            if entry is None:
                gathered[key], flats[key] = ModuleParts(key, [(ratio, m, name)], shape, known), flat_shape
                continue
            _, first, first_name = entry.parts[0]
            if not shapes_agree(entry.shape if entry.known else None, flats[key], shape if known else None, flat_shape):
                raise ConfigError(
                    f"module {key}: {first_name} has {first.label} {describe(first)} but {name} has "
                    f"{m.label} {describe(m)}: these LoRAs are for different models (SD 1.x and 2.x?) and "
                    "cannot be merged"
                )
            entry.parts.append((ratio, m, name))
            if not entry.known and known:
                entry.shape, entry.known = shape, True
    _report_partial(gathered, loras, names)
    return list(gathered.values())


def _report_partial(gathered, loras, names):
    for component in {c for lora in loras for c in lora.components}:
        missing = [n for lora, n in zip(loras, names, strict=True) if component not in lora.components]
        if missing:
            logger.info("%s has no %s modules: the %s is merged from the other LoRAs only",
                        ", ".join(missing), component, component)
    partial = [e.key for e in gathered.values() if len(e.parts) < len(loras)]
    if partial:
        logger.info("%d module(s) are in only some of the LoRAs (e.g. %s): merged from those", len(partial), partial[0])
