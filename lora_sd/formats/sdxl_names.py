"""SDXL U-Net module names: diffusers <-> the original (SGM / LDM) layout that SDXL kohya files use.

sd-scripts trains SDXL on its own U-Net, whose modules carry the original
names, so SDXL kohya files say `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
where diffusers says `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
diffusers only converts original -> diffusers checkpoints
(`convert_ldm_unet_checkpoint`) and has no module-name map either way, so the
map is built here, once, from the U-Net's config (FORMATS.md, SDXL section):
input/output block numbers follow from `layers_per_block`, and which levels
have attentions and samplers from `down_block_types` / `up_block_types`.

Reading a file without a model uses SDXL's base config (`SDXL_UNET_LAYOUT`:
layers_per_block 2, attention on levels 1 and 2). A U-Net whose levels are a
prefix of that layout (the tiny SDXL) has the same names; any other layout
needs its config passed (`SgmNames(unet.config)`).
"""

from functools import lru_cache

from lora_sd.errors import FormatError

# the parts of SDXL base's U-Net config that decide the module names
SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}

# inside blocks: ResnetBlock2D, Downsample2D, Upsample2D (attentions keep their names)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_DOWNSAMPLER = {"conv": "op"}
_UPSAMPLER = {"conv": "conv"}
_ATTENTION = {}  # unchanged
# modules outside the blocks
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _per_level(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class SgmNames:
    """The two-way module-name map of one U-Net layout (a diffusers U-Net config, or its three keys)."""

    def __init__(self, config=None):
        config = dict(config or SDXL_UNET_LAYOUT)
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        layers = _per_level(config["layers_per_block"], len(down_types))
        self.blocks = []  # (diffusers prefix, sgm prefix, inner renames)
        self.blocks += [(d, s, {}) for d, s in _TOP.items()]
        n = 1  # input_blocks.0 is conv_in
        for i, kind in enumerate(down_types):
            for j in range(layers[i]):
                self.blocks.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _RESNET))
                if "CrossAttn" in kind:
                    self.blocks.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", _ATTENTION))
                n += 1
            if i < len(down_types) - 1:  # diffusers: add_downsample = not is_final_block
                self.blocks.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{n}.0", _DOWNSAMPLER))
                n += 1
        for k, (d, s) in enumerate([("resnets.0", "0"), ("attentions.0", "1"), ("resnets.1", "2")]):
            self.blocks.append((f"mid_block.{d}", f"middle_block.{s}", _ATTENTION if k == 1 else _RESNET))
        n = 0
        up_layers = list(reversed(layers))
        for i, kind in enumerate(up_types):
            attention = "CrossAttn" in kind
            for j in range(up_layers[i] + 1):
                self.blocks.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _RESNET))
                if attention:
                    self.blocks.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", _ATTENTION))
                n += 1
            if i < len(up_types) - 1:  # diffusers: add_upsample = not is_final_block; on the level's last block
                self.blocks.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{n - 1}.{2 if attention else 1}",
                                    _UPSAMPLER))
        self._to_sgm = {d: (s, inner) for d, s, inner in self.blocks}
        self._from_sgm = {s: (d, {v: k for k, v in inner.items()}) for d, s, inner in self.blocks}

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
            if inner:  # resnets and samplers: every Linear/Conv inside has a known name
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
