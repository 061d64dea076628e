"""sd-scripts' U-Net blocks (networks/lora.py): block-wise ranks, alphas and learning-rate weights.

SD 1.x/2.x: 25 blocks. Block 0 has no LoRA; `down_blocks.i.{resnets,attentions}.j` is block 1 + 3i + j and
`down_blocks.i.downsamplers` block 3i + 3; `mid_block` is 12; `up_blocks.i.{resnets,attentions}.j` is
13 + 3i + j and `up_blocks.i.upsamplers` 13 + 3i + 2 (the same block as the level's third resnet).
`down_lr_weight` / `up_lr_weight` have 12 values (blocks 1-12 / 13-24), `mid_lr_weight` one.

SDXL: 23 blocks, numbered by the original layout's names: `input_blocks.N` is 1 + N, `middle_block.N`
10 + N, `output_blocks.N` 13 + N (0 is time_embed, 22 the output: no LoRA there). `down_lr_weight` /
`up_lr_weight` have 9 values, `mid_lr_weight` 3.

Any lr weight given, or `block_dims`, turns on block-wise ranks: every U-Net module takes its block's dim
and alpha (`block_dims`/`block_alphas`, else network_dim/network_alpha; 3x3 convs `conv_block_dims`/
`conv_block_alphas`, else conv_dim/conv_alpha); a block whose lr weight is 0 (or at most
`block_lr_zero_threshold`) gets no modules at all, and a dim of 0 none either. An alpha of 0 is the rank.
"""

import logging
import math
import re

from lora_sd.config.kv_args import LIST_LENGTHS
from lora_sd.errors import ConfigError

logger = logging.getLogger(__name__)

LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIMS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
_SD_BLOCK = re.compile(r"^(up|down)_blocks\.(\d+)\.(resnets|attentions|upsamplers|downsamplers)\.(\d+)\.")


def is_sdxl_unet(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def block_index(name: str, unet) -> int:
    """sd-scripts' block number of a U-Net module (diffusers path)."""
    if is_sdxl_unet(unet):
        from lora_sd.formats.sdxl_names import names_for

        top, number = names_for(unet.config).to_sgm(name).split(".")[:2]
        first = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13}
        return 22 if top == "out" else first[top] + (int(number) if top in ("input_blocks", "middle_block",
                                                                              "output_blocks") else 0)
    if name.startswith("mid_block."):
        return 12
    m = _SD_BLOCK.match(name + ".")
    if not m:
        raise ConfigError(f"U-Net module {name} is in no SD block (block-wise network_args)")
    side, level, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    idx = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else j)
    return 1 + idx if side == "down" else 13 + idx


class Blocks:
    """The block-wise network_args of one network on one model family; `active` when any is given."""

    def __init__(self, args: dict, sdxl: bool, network_dim, network_alpha, conv_dim, conv_alpha):
        self.sdxl = sdxl
        self.count = 23 if sdxl else 25
        self.lr_weight = self._lr_weights(args)
        self.active = self.lr_weight is not None or "block_dims" in args
        for key in ("block_alphas", "conv_block_alphas", "block_lr_zero_threshold"):
            needs = "conv_block_dims" if key == "conv_block_alphas" else "block_dims or *_lr_weight"
            if key in args and not (self.active and (key != "conv_block_alphas" or "conv_block_dims" in args)):
                logger.warning("network_args %s does nothing without %s (as in sd-scripts)", key, needs)
        self.dims = self._list(args, "block_dims", network_dim)
        self.alphas = self._list(args, "block_alphas", network_alpha)
        if "conv_block_dims" in args:
            self.conv_dims = self._list(args, "conv_block_dims", None)
            self.conv_alphas = self._list(args, "conv_block_alphas", conv_alpha or 1.0)
        else:
            self.conv_dims = [conv_dim] * self.count if conv_dim else None
            self.conv_alphas = [conv_alpha or 1.0] * self.count
        for i, w in enumerate(self.lr_weight or []):
            if w == 0:  # sd-scripts: no modules in a block that would not learn
                self.dims[i] = 0
                if self.conv_dims:
                    self.conv_dims[i] = 0

    @property
    def with_conv(self) -> bool:
        return bool(self.conv_dims)

    def _check_length(self, key, values):
        want = LIST_LENGTHS[key][1 if self.sdxl else 0]
        if len(values) != want:
            family = "SDXL" if self.sdxl else "SD 1.x/2.x"
            raise ConfigError(f"`network_args` {key} has {len(values)} values, but a {family} U-Net has {want} "
                              f"{'blocks' if 'dims' in key or 'alphas' in key else 'such blocks'}: give {want}")

    def _list(self, args, key, default):
        if key not in args:
            return [default] * self.count
        self._check_length(key, args[key])
        return list(args[key])

    def _lr_weights(self, args):
        if not any(k in args for k in LR_WEIGHTS):
            return None
        side = 9 if self.sdxl else 12
        parts = {}
        for key in LR_WEIGHTS:
            value = args.get(key)
            if value is None:
                value = [1.0] * (3 if self.sdxl and key == "mid_lr_weight" else 1 if key == "mid_lr_weight" else side)
            elif isinstance(value, str):
                value = _shape(value, side)
            else:
                self._check_length(key, value)
            threshold = args.get("block_lr_zero_threshold", 0.0)
            parts[key] = [w if w > threshold else 0.0 for w in value] if key in args else list(value)
        weights = parts["down_lr_weight"] + parts["mid_lr_weight"] + parts["up_lr_weight"]
        # SD: down + mid + up are blocks 0-24 (the first down weight is block 0's, which has no LoRA, as in
        # sd-scripts); SDXL: time_embed (0) and the output (22) around them
        return [1.0] + weights + [1.0] if self.sdxl else weights

    def rank_alpha(self, index: int, is_3x3: bool):
        """(rank, alpha) of a module in block `index` (rank 0: no module)."""
        dims, alphas = (self.conv_dims, self.conv_alphas) if is_3x3 else (self.dims, self.alphas)
        if not dims:
            return 0, 0.0
        rank = dims[index]
        return rank, float(alphas[index] or rank)

    def weight(self, index: int) -> float:
        return 1.0 if self.lr_weight is None else self.lr_weight[index]


def _shape(value: str, n: int) -> list[float]:
    """sd-scripts' named lr-weight shapes over n blocks, plus an optional base ("cosine+0.5")."""
    name, _, base = value.partition("+")
    base = float(base) if base else 0.0
    up = [i / (n - 1) for i in range(n)]
    shapes = {"cosine": [math.sin(math.pi * x / 2) for x in reversed(up)], "sine": [math.sin(math.pi * x / 2) for x in up],
              "linear": up, "reverse_linear": list(reversed(up)), "zeros": [0.0] * n}
    return [w + base for w in shapes[name.strip()]]
