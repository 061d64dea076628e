"""sd-scripts' networks.lora target rules, as PEFT LoraConfigs.

sd-scripts walks `named_modules()` and, inside modules of the classes below,
adapts every Linear and Conv2d: Linear and 1x1 convs at network_dim /
network_alpha, 3x3 convs at conv_dim / conv_alpha (only when conv_dim is set).
PEFT has no notion of "children of a class", so we list the module names
explicitly and give convs their own rank through rank/alpha patterns.

SDXL: the same rules on both text encoders (CLIPAttention/CLIPMLP of each;
text encoder 2's `text_projection` is outside them, so not adapted, as in
sd-scripts) and on the U-Net.
"""

from dataclasses import dataclass

import torch
from peft import LoraConfig

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


def unet_lora_config(unet, spec: NetworkSpec) -> LoraConfig:
    """PEFT config adapting exactly the U-Net modules sd-scripts adapts."""
    targets = target_modules("unet", unet, with_conv=bool(spec.conv_dim))
    convs = [n for n, is_conv in targets.items() if is_conv]
    return LoraConfig(
        r=spec.network_dim,
        lora_alpha=spec.network_alpha,
        target_modules=list(targets),
        rank_pattern={n: spec.conv_dim for n in convs},
        alpha_pattern={n: spec.conv_alpha for n in convs},
        init_lora_weights=True,
    )


def text_encoder_lora_config(text_encoder, spec: NetworkSpec) -> LoraConfig:
    """PEFT config adapting the CLIP attention projections and MLP fc1/fc2."""
    targets = target_modules("text_encoder", text_encoder)
    return LoraConfig(r=spec.network_dim, lora_alpha=spec.network_alpha, target_modules=list(targets))


def lora_configs(unet, text_encoder, spec: NetworkSpec, train_unet=True, train_text_encoder=True,
                 text_encoder_2=None):
    """{"unet": LoraConfig, "text_encoder": LoraConfig, "text_encoder_2": LoraConfig (SDXL)} for the parts
    being trained (`train_text_encoder`: both text encoders, as sd-scripts' SDXL network)."""
    configs = {}
    if train_unet:
        configs["unet"] = unet_lora_config(unet, spec)
    if train_text_encoder:
        configs["text_encoder"] = text_encoder_lora_config(text_encoder, spec)
        if text_encoder_2 is not None:
            configs["text_encoder_2"] = text_encoder_lora_config(text_encoder_2, spec)
    return configs
