"""sd-scripts' networks.lora target rules, as PEFT configs (LoRA, DoRA, LoHa, LoKr).

sd-scripts walks `named_modules()` and, inside modules of the classes below,
adapts every Linear and Conv2d: Linear and 1x1 convs at network_dim /
network_alpha, 3x3 convs at conv_dim / conv_alpha (only when conv_dim is set).
PEFT has no notion of "children of a class", so we list the module names
explicitly and give convs their own rank through rank/alpha patterns.

SDXL: the same rules on both text encoders (CLIPAttention/CLIPMLP of each;
text encoder 2's `text_projection` is outside them, so not adapted, as in
sd-scripts) and on the U-Net.

LyCORIS' algorithms (`network_module = "lycoris.kohya"`) use the same targets:
LoHa and LoKr are PEFT's LoHaConfig / LoKrConfig, DoRA is LoraConfig(use_dora=True).
Each starts with a zero delta, as LyCORIS' modules do.
"""

from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.lokr.layer import factorization

from lora_sd.blocks import Blocks, block_index, is_sdxl_unet
from lora_sd.errors import ConfigError

UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class NetworkSpec:
    """The ranks and alphas a LoRA network is created with (kohya names).

    An alpha of 0 means alpha = the rank (scale 1), as sd-scripts' LoRAModule does
    (`alpha = lora_dim if alpha is None or alpha == 0`); for conv_alpha, the rank is conv_dim.
    """

    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float = 1.0
    algo: str = "lora"  # the adapter kind: lora (locon), loha, lokr
    dora: bool = False  # LyCORIS' dora_wd (lora only)
    factor: int = -1  # LoKr's decompose_factor: -1 splits each dimension as squarely as possible
    decompose_both: bool = False  # LoKr: the smaller factor low-rank too
    use_tucker: bool = False  # LoHa/LoKr 3x3 convs: Tucker cores (PEFT's use_effective_conv2d)
    rank_dropout: float = 0.0  # LoHa/LoKr: PEFT's; LoRA/DoRA: lora_sd.training.regularize
    module_dropout: float = 0.0
    dropout: float = 0.0  # network_dropout: PEFT's lora_dropout (LoRA/DoRA)
    blocks: tuple = ()  # the block-wise network_args as (key, value) pairs (lora_sd.blocks), with the raw alphas

    def __post_init__(self):
        if not self.network_alpha:
            object.__setattr__(self, "network_alpha", float(self.network_dim))
        if not self.conv_alpha and self.conv_dim:
            object.__setattr__(self, "conv_alpha", float(self.conv_dim))


def _is_3x3(module):
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def find_targets(model, target_classes, with_conv):
    """Names of the modules sd-scripts adapts, in `named_modules()` order.

    Returns {module name: is_3x3_conv}. A module reached from two targeted
    parents is listed once, as sd-scripts' dict of names does.
    """
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if _is_3x3(child) and not with_conv:
                continue
            full = f"{name}.{child_name}" if name else child_name
            found.setdefault(full, _is_3x3(child))
    return found


def target_modules(component: str, model, with_conv=False):
    """{module name: is_3x3_conv} sd-scripts adapts in a "unet", "text_encoder" or "text_encoder_2".

    `with_conv` (conv_dim set) adds the U-Net's resnets and samplers, 3x3 convs included.
    """
    if component == "unet":
        return find_targets(model, UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if with_conv else ()), with_conv)
    return find_targets(model, TEXT_ENCODER_TARGET_CLASSES, with_conv=False)


def adapter_config(targets: dict, spec: NetworkSpec, model, ranks: dict | None = None):
    """The PEFT config of `spec`'s kind on `targets` ({module name: is_3x3}); 3x3 convs at conv_dim/conv_alpha
    through rank/alpha patterns, or each module at its own `ranks` {name: (rank, alpha)} (block_dims)."""
    if ranks is None:
        ranks = {n: (spec.conv_dim, spec.conv_alpha) if is_conv else (spec.network_dim, spec.network_alpha)
                 for n, is_conv in targets.items()}
    common = dict(r=spec.network_dim, target_modules=list(ranks),
                  rank_pattern={n: r for n, (r, _) in ranks.items() if r != spec.network_dim or targets[n]})
    alphas = {n: a for n, (_, a) in ranks.items() if a != spec.network_alpha or targets[n]}
    if spec.algo == "lora":
        return LoraConfig(lora_alpha=spec.network_alpha, alpha_pattern=alphas, init_lora_weights=True,
                          use_dora=spec.dora, lora_dropout=spec.dropout, **common)
    lycoris = dict(rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout,
                   use_effective_conv2d=spec.use_tucker, **common)
    if spec.algo == "loha":  # PEFT's init: hada_w2_b zero (LyCORIS zeroes hada_w2_a): the delta starts at zero
        return LoHaConfig(alpha=spec.network_alpha, alpha_pattern=alphas, **lycoris)
    for name in ranks:  # LyCORIS ignores alpha where no factor is decomposed (scale 1); PEFT divides by r
        rank = common["rank_pattern"].get(name, spec.network_dim)
        if lokr_factors_full(model.get_submodule(name).weight.shape, rank, spec.factor, spec.decompose_both):
            alphas[name] = float(rank)
    return LoKrConfig(alpha=spec.network_alpha, alpha_pattern=alphas, decompose_factor=spec.factor,
                      decompose_both=spec.decompose_both, init_weights="lycoris", **lycoris)


def lokr_layout(weight_shape, rank, factor=-1, decompose_both=False):
    """((w1 shape, w1 decomposed), (w2 out, w2 in, w2 decomposed)) of a LoKr on a weight: PEFT's (and LyCORIS')
    rule, copied because PEFT decides it inside the layer: each dimension split by `factorization`, w2 low-rank
    when rank < half its larger side, w1 only with decompose_both."""
    (a, b), (c, d) = factorization(weight_shape[0], factor), factorization(weight_shape[1], factor)
    return ((a, c), decompose_both and rank < max(a, c) / 2), (b, d, rank < max(b, d) / 2)


def lokr_factors_full(weight_shape, rank, factor=-1, decompose_both=False) -> bool:
    (_, w1_low), (_, _, w2_low) = lokr_layout(weight_shape, rank, factor, decompose_both)
    return not w1_low and not w2_low


def unet_lora_config(unet, spec: NetworkSpec):
    """PEFT config adapting exactly the U-Net modules sd-scripts adapts (block-wise: lora_sd.blocks)."""
    blocks = unet_blocks(unet, spec)
    if not blocks.active:
        return adapter_config(target_modules("unet", unet, with_conv=bool(spec.conv_dim)), spec, unet)
    targets = target_modules("unet", unet, with_conv=blocks.with_conv)
    ranks = {n: blocks.rank_alpha(block_index(n, unet), is_conv) for n, is_conv in targets.items()}
    ranks = {n: ra for n, ra in ranks.items() if ra[0]}  # rank 0 (or lr weight 0): no module, as sd-scripts
    if not ranks:
        raise ConfigError("`network_args`: every U-Net block has a dim or lr weight of 0: nothing to train in the "
                          "U-Net (use network_train_text_encoder_only for that)")
    return adapter_config(targets, spec, unet, ranks)


def unet_blocks(unet, spec: NetworkSpec) -> Blocks:
    """The block-wise args of `spec` on this U-Net's family."""
    args = dict(spec.blocks)
    return Blocks(args, is_sdxl_unet(unet), spec.network_dim, args.get("network_alpha", spec.network_alpha),
                  spec.conv_dim, args.get("conv_alpha", spec.conv_alpha))


def text_encoder_lora_config(text_encoder, spec: NetworkSpec):
    """PEFT config adapting the CLIP attention projections and MLP fc1/fc2."""
    return adapter_config(target_modules("text_encoder", text_encoder), spec, text_encoder)


def lora_configs(unet, text_encoder, spec: NetworkSpec, train_unet=True, train_text_encoder=True,
                 text_encoder_2=None):
    """{"unet": config, "text_encoder": config, "text_encoder_2": config (SDXL)} for the parts
    being trained (`train_text_encoder`: both text encoders, as sd-scripts' SDXL network)."""
    configs = {}
    if train_unet:
        configs["unet"] = unet_lora_config(unet, spec)
    if train_text_encoder:
        configs["text_encoder"] = text_encoder_lora_config(text_encoder, spec)
        if text_encoder_2 is not None:
            configs["text_encoder_2"] = text_encoder_lora_config(text_encoder_2, spec)
    return configs
