"""SDXL U-Net module names: diffusers <-> the original (SGM / LDM) layout that SDXL kohya files use.

sd-scripts trains SDXL on its own U-Net, whose modules carry the original
names, so SDXL kohya files say `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
where diffusers says `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
diffusers only converts original -> diffusers checkpoints
(`convert_ldm_unet_checkpoint`) and has no module-name map either way, so the
map comes from the U-Net's config (FORMATS.md, SDXL section), through the
block map of the original-layout model writer (`lora_sd.models.original_layout`):
input/output block numbers follow from `layers_per_block`, and which levels
have attentions and samplers from `down_block_types` / `up_block_types`.

Reading a file without a model uses SDXL's base config (`SDXL_UNET_LAYOUT`:
layers_per_block 2, attention on levels 1 and 2). A U-Net whose levels are a
prefix of that layout (the tiny SDXL) has the same names; any other layout
needs its config passed (`SgmNames(unet.config)`).
"""

from functools import lru_cache

from lora_sd.errors import FormatError
# the block map the original-layout model writer uses: one map for models and LoRA files
from lora_sd.models.original_layout import _UNET_RESNET, _UNET_TOP, _unet_block_map

# the parts of SDXL base's U-Net config that decide the module names
SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}


class SgmNames:
    """The two-way module-name map of one U-Net layout (a diffusers U-Net config, or its three keys).

    Resnets rename their layers (`conv1` -> `in_layers.2`, ...); attentions keep theirs; samplers and
    the modules outside the blocks are mapped whole (`down_blocks.0.downsamplers.0.conv` -> `input_blocks.3.0.op`).
    """

    def __init__(self, config=None):
        blocks = {**_UNET_TOP, **_unet_block_map(dict(config or SDXL_UNET_LAYOUT))}
        inner = {d: _UNET_RESNET if ".resnets." in d + "." else {} for d in blocks}
        self._to_sgm = {d: (s, inner[d]) for d, s in blocks.items()}
        self._from_sgm = {s: (d, {v: k for k, v in inner[d].items()}) for d, s in blocks.items()}

    def to_sgm(self, path: str) -> str:
        """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (a U-Net module path)."""
        return _rename(path, self._to_sgm, "diffusers")

    def from_sgm(self, path: str) -> str:
        """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in`."""
        return _rename(path, self._from_sgm, "original-layout (SGM)")


def _rename(path, table, layout):
    """Replace the longest block prefix of `path` found in `table`, then the name inside the block."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            new_prefix, inner = table[prefix]
            rest = ".".join(parts[cut:])
            if not rest:
                return new_prefix
            if inner:  # resnets: every Linear/Conv inside has a known name
                if rest not in inner:
                    break
                rest = inner[rest]
            return f"{new_prefix}.{rest}"
    raise FormatError(f"U-Net module {path!r} is no {layout} module name of an SDXL U-Net")


@lru_cache
def base_names() -> SgmNames:
    """The map for SDXL base's layout (what reading a file without a model assumes)."""
    return SgmNames()


def names_for(unet_config=None) -> SgmNames:
    """The map for this U-Net config, or SDXL base's when none is given."""
    return SgmNames(unet_config) if unet_config is not None else base_names()


def is_sgm_unet_path(path: str) -> bool:
    """A U-Net module path in the original layout (what only SDXL kohya files use)."""
    return path.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb",
                                     "out")
