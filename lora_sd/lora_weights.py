"""LoraWeights: the one in-memory form of a LoRA.

Every file format reads into and writes from this; merge, SVD merge,
extraction and conversion are functions on it. A module is keyed by its
diffusers path with the component first (`unet.down_blocks.0...to_q`,
`text_encoder.text_model.encoder.layers.0.mlp.fc1`): the transformers-4 path,
which is what files use. transformers 5 dropped `text_model.` from
CLIPTextModel's module names (CLIPTextModelWithProjection, SDXL's
`text_encoder_2`, keeps it); `model_module_name` / `key_for_module` are the
one place that maps between the two, for both text encoders.
"""

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from lora_sd import adapter_math
from lora_sd.errors import ModelMismatchError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The SD U-Net's 3x3 convs by their last path component (resnets' conv1/conv2, down/upsamplers' conv, conv_in,
# conv_out; conv_shortcut is 1x1): LoHa/LoKr files store them flattened ([out, in*9]), hiding the kernel
UNET_3X3_NAMES = frozenset({"conv1", "conv2", "conv", "conv_in", "conv_out"})


def is_unet_3x3(key: str) -> bool:
    """Whether LoraWeights key `key` names one of the U-Net's 3x3 convs."""
    return key.startswith("unet.") and key.rsplit(".", 1)[-1] in UNET_3X3_NAMES
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
TE_PREFIX = "text_model."


@dataclass
class LoraModule:
    """One adapted module: its kind ("lora", "loha", "lokr"), its tensors, its alpha, and DoRA's magnitude.

    A plain LoRA keeps `down` / `up` (delta W = up @ down * alpha / rank); LoHa and
    LoKr keep their tensors in `tensors` under LyCORIS' names (hada_w1_a, lokr_w1,
    ...; `down`/`up` are None). `dora_scale` makes any kind DoRA. The delta of
    every kind is defined once, in `adapter_math`. `shape` is the adapted
    weight's shape where the tensors do not tell it (LoHa/LoKr keep 3x3 convs
    flattened); None when unknown.
    """

    down: torch.Tensor | None  # [rank, in] or [rank, in, k, k]
    up: torch.Tensor | None  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    kind: str = "lora"
    tensors: dict = field(default_factory=dict)
    dora_scale: torch.Tensor | None = None  # [out, 1(, 1, 1)] per output row, or [1, in(, 1, 1)] per input column
    shape: tuple | None = None

    @classmethod
    def of_kind(cls, kind, tensors: dict, alpha, dora_scale=None, shape=None) -> "LoraModule":
        """A module from its tensors under file names (`lora_down.weight`, `hada_w1_a`, ...)."""
        if kind == "lora":
            return cls(tensors["lora_down.weight"], tensors["lora_up.weight"], float(alpha),
                       dora_scale=dora_scale, shape=shape)
        return cls(None, None, float(alpha), kind, dict(tensors), dora_scale, shape)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """{file tensor name: tensor} of this module's factors (alpha and dora_scale not included)."""
        if self.kind == "lora":
            return {"lora_down.weight": self.down, "lora_up.weight": self.up}
        return dict(self.tensors)

    @property
    def label(self) -> str:
        """'LoRA', 'LoHa', 'LoKr', with ' (DoRA)' for a module with a magnitude: the kind in messages."""
        return KIND_NAMES[self.kind] + (" (DoRA)" if self.dora_scale is not None else "")

    @property
    def rank(self) -> int | None:
        """The rank the alpha is divided by; None for a LoKr with no decomposed factor (scale 1)."""
        return adapter_math.kind_rank(self.kind, self.named_tensors())

    @property
    def scale(self) -> float:
        return adapter_math.kind_scale(self.kind, self.named_tensors(), self.alpha)

    def delta_shape(self) -> tuple:
        """What the tensors multiply out to ([out, in*k*k] for a flattened conv, 4-D when a factor is), computed
        on the meta device (shapes only); ValueError when they do not multiply out (ranks that differ, ...)."""
        meta = {n: t.to("meta") for n, t in self.named_tensors().items()}
        try:
            return tuple(adapter_math.delta(self.kind, meta, self.alpha).shape)
        except (RuntimeError, KeyError) as e:  # factors that do not multiply, or a missing one
            raise ValueError(f"its {self.label} tensors do not multiply out ({e})") from None

    def weight_shape(self) -> tuple:
        """The adapted weight's shape: `shape` when set, else what the tensors tell ([out, in*k*k] for a
        flattened LoHa/LoKr conv)."""
        if self.shape is not None:
            return tuple(self.shape)
        if self.kind == "lora":
            return (self.up.shape[0], *self.down.shape[1:])
        return self.delta_shape()

    @property
    def is_3x3(self) -> bool:
        """A conv with a kernel larger than 1x1 (kohya's conv_dim / conv_alpha modules)."""
        shape = self.weight_shape()
        return len(shape) == 4 and shape[2:] != (1, 1)

    def delta(self, dtype=torch.float32, shape=None) -> torch.Tensor:
        """The full weight delta, shaped like the module's weight (`shape`, else `weight_shape()`).

        DoRA's magnitude is not in it: a DoRA module changes the weight by `merged(weight) - weight`."""
        t = {k: v.to(dtype) for k, v in self.named_tensors().items()}
        return adapter_math.delta(self.kind, t, self.alpha, shape or self.weight_shape())

    def merged(self, weight, multiplier=1.0, dtype=torch.float32) -> torch.Tensor:
        """`weight` with this module added at `multiplier`, in `dtype`; DoRA as ComfyUI applies a strength:
        W + multiplier * (DoRA(W) - W)."""
        w = weight.to(dtype)
        d = self.delta(dtype, tuple(weight.shape))
        if self.dora_scale is None:
            return w + multiplier * d
        return w + multiplier * (adapter_math.dora_weight(w, d, self.dora_scale.to(dtype)) - w)


@dataclass
class LoraWeights:
    """All adapted modules of a LoRA, plus the file metadata it came with."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def component(self, name: str) -> dict[str, LoraModule]:
        """{module path inside the component: module} for 'unet', 'text_encoder', ..."""
        prefix = name + "."
        return {k[len(prefix):]: m for k, m in self.modules.items() if k.startswith(prefix)}

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.modules)]

    def to(self, dtype, device="cpu") -> "LoraWeights":
        """A copy with every tensor detached, contiguous, in `dtype` on `device` (the CPU: what files hold)."""

        def convert(t):
            return t.detach().to(device, dtype).contiguous()

        mods = {}
        for k, m in self.modules.items():
            dora = convert(m.dora_scale) if m.dora_scale is not None else None
            tensors = {n: convert(t) for n, t in m.named_tensors().items()}
            mods[k] = LoraModule.of_kind(m.kind, tensors, m.alpha, dora, m.shape)
        return LoraWeights(mods, dict(self.metadata))

    def with_one_alpha(self) -> "LoraWeights":
        """A copy whose plain-LoRA modules all have the most common alpha, each module's own scale moved into its
        up weights (every delta unchanged). For the ops that pick alphas themselves (SVD merge, exact merge,
        extraction): diffusers (0.42) misnames the alphas of attention projections (to_q/k/v/out,
        q/k/v/out_proj) and gives them the file's most common alpha, so per-module alphas (alpha = rank of a
        clamped module) would load wrong there; ComfyUI, AUTOMATIC1111 and sd-scripts read either."""
        alphas = Counter(m.alpha for m in self.modules.values() if m.kind == "lora" and m.alpha)
        if not alphas:
            return self
        common = alphas.most_common(1)[0][0]
        mods = {k: m if m.kind != "lora" or m.alpha == common else
                LoraModule(m.down, m.up * (m.alpha / common), common, dora_scale=m.dora_scale, shape=m.shape)
                for k, m in self.modules.items()}
        return LoraWeights(mods, dict(self.metadata))

    # --- PEFT models (lora_sd.peft_bridge) ---------------------------------------

    @classmethod
    def from_peft_models(cls, adapter_name="default", **models) -> "LoraWeights":
        """Read the adapter `adapter_name` (any kind) from PEFT-adapted models, e.g. unet=..., text_encoder=..."""
        from lora_sd import peft_bridge

        return peft_bridge.from_peft_models(adapter_name, **models)

    def peft_config(self, component: str, model=None):
        """The PEFT config (LoraConfig, LoHaConfig, LoKrConfig) that recreates this component's modules."""
        from lora_sd import peft_bridge

        return peft_bridge.peft_config(self, component, model)

    def peft_state_dict(self, component: str, model=None) -> dict[str, torch.Tensor]:
        """This component's tensors under PEFT's names (`<module>.lora_A.weight`, `<module>.hada_w1_a`, ...)."""
        from lora_sd import peft_bridge

        return peft_bridge.peft_state_dict(self, component, model)

    def apply_to(self, adapter_name="default", **models):
        """Inject this LoRA (any kind) into models (unet=..., text_encoder=...) as the PEFT adapter `adapter_name`.

        Every module of every component is checked to fit before any model changes.
        """
        from lora_sd import peft_bridge

        peft_bridge.apply_to(self, adapter_name, **models)


def key_for_module(component: str, module_name: str) -> str:
    """LoraWeights key for a module name as the in-memory model spells it."""
    if component.startswith("text_encoder") and not module_name.startswith(TE_PREFIX):
        module_name = TE_PREFIX + module_name
    return f"{component}.{module_name}"


def model_module_name(component: str, path: str, model=None) -> str:
    """The model's own module name for a path inside a LoraWeights component."""
    if component.startswith("text_encoder") and path.startswith(TE_PREFIX):
        if model is None or not hasattr(model, "text_model"):
            return path[len(TE_PREFIX):]
    return path


def fit_to_layer(layer, m, key: str):
    """(base layer, `m` shaped for it): ModelMismatchError naming `key` when it is missing or does not fit.

    `layer` is a Linear or Conv2d, PEFT-wrapped or not. LoRA factors that are
    2-D and 1x1-conv 4-D are reshaped to the layer (SD2 proj_in/proj_out files
    have either, depending on what sd-scripts trained from); LoHa/LoKr deltas
    must have the weight's element count per output row; DoRA magnitudes must
    fit one of the weight's axes. The module returned has `shape` = the weight's.
    """
    if isinstance(layer, BaseTunerLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        raise ModelMismatchError(f"{KIND_NAMES[m.kind]} module {key} does not exist in the model")
    weight_shape = tuple(layer.weight.shape)  # [out, in] or [out, in, k, k]
    tensors = _fit_lora(m, weight_shape, key) if m.kind == "lora" else _check_delta(m, weight_shape, key)
    dora = m.dora_scale
    if dora is not None:
        try:
            axis = adapter_math.dora_axis(dora, weight_shape)
        except ValueError as e:
            raise ModelMismatchError(f"DoRA module {key} does not fit the model: {e}") from None
        unit = [1] * (len(weight_shape) - 1)
        dora = dora.reshape(weight_shape[0], *unit) if axis == "output" else dora.reshape(1, weight_shape[1], *unit[1:])
    return layer, LoraModule.of_kind(m.kind, tensors, m.alpha, dora, weight_shape)


def _fit_lora(m, weight_shape, key) -> dict:
    down, up = m.down, m.up
    if len(weight_shape) == 2:
        down = down.flatten(1) if down.dim() == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.dim() == 4 and up.shape[2:] == (1, 1) else up
        want_up = (weight_shape[0], m.rank)
    else:
        down = down[:, :, None, None] if down.dim() == 2 and weight_shape[2:] == (1, 1) else down
        up = up[:, :, None, None] if up.dim() == 2 else up
        want_up = (weight_shape[0], m.rank, 1, 1)
    want_down = (m.rank, *weight_shape[1:])
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ModelMismatchError(
            f"LoRA module {key} does not fit the model: down {tuple(m.down.shape)}, up {tuple(m.up.shape)}; "
            f"the layer needs down {want_down}, up {want_up}"
        )
    return {"lora_down.weight": down, "lora_up.weight": up}


def _check_delta(m, weight_shape, key) -> dict:
    """LoHa/LoKr: the delta (computed on the meta device: shapes only) must reshape to the weight."""
    try:
        shape = m.delta_shape()
    except ValueError as e:
        raise ModelMismatchError(f"{KIND_NAMES[m.kind]} module {key}: {e}") from None
    fits = shape[0] == weight_shape[0] and math.prod(shape[1:]) == math.prod(weight_shape[1:])
    if len(shape) == 4 and len(weight_shape) == 4:
        fits = fits and shape == weight_shape  # a Tucker or 4-D factor fixes the kernel
    if not fits:
        raise ModelMismatchError(
            f"{KIND_NAMES[m.kind]} module {key} does not fit the model: its delta is {shape}, the layer's weight "
            f"is {weight_shape}"
        )
    return dict(m.tensors)
