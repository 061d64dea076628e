"""The weight a module adapts, for every kind, and whether it fits a model's layer or another LoRA's module.

Shapes are found by running the module's own delta on the meta device (shapes, no arithmetic), so
every kind's tensors are checked to multiply out with the one definition in `adapter_math`, and a
mismatch is found before any weight changes. LoHa/LoKr files store 3x3 convs flattened
([out, in*k*k]): the kernel is then known only from the module's `shape` (readers set it), a 4-D
factor, or another LoRA of the same module.
"""

import math


from lora_sd.errors import ModelMismatchError
from lora_sd.lora_weights import LoraModule, fit_to_layer, is_unet_3x3

def describe(m: LoraModule) -> str:
    """The module's tensors and shapes for messages: 'down (4, 8), up (8, 4)' or 'hada_w1_a (8, 2), ...'."""
    named = {"down": m.down, "up": m.up} if m.kind == "lora" else m.named_tensors()
    if m.dora_scale is not None:
        named["dora_scale"] = m.dora_scale
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in named.items())


def delta_shape(m: LoraModule, key: str) -> tuple:
    """What the tensors multiply out to ([out, in*k*k], or 4-D when a factor is); ModelMismatchError naming
    `key` when they do not (a rank that differs between factors, ...)."""
    try:
        return m.delta_shape()
    except ValueError:
        raise ModelMismatchError(f"LoRA module {key} does not fit: its {m.label} tensors {describe(m)} "
                                 "do not multiply out") from None


def flat(shape) -> tuple:
    """(out, in*k*k)."""
    return shape[0], math.prod(shape[1:])


def squeezed(shape) -> tuple:
    """A 1x1 conv's shape as a Linear's (SD2 files hold proj_in/proj_out either way)."""
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def weight_shape(m: LoraModule, key: str) -> tuple | None:
    """The adapted weight's shape with its kernel, or None for a flattened LoHa/LoKr 3x3 conv whose kernel
    nothing tells (no `shape`, no 4-D factor). ModelMismatchError when the tensors do not fit together."""
    delta = delta_shape(m, key)
    if m.shape is not None:
        if flat(m.shape) != flat(delta):
            raise ModelMismatchError(f"LoRA module {key}: its {m.label} tensors ({describe(m)}) make a "
                                     f"{flat(delta)} delta, not one for its weight shape {tuple(m.shape)}")
        return tuple(m.shape)
    if m.kind == "lora":
        return (delta[0], *m.down.shape[1:])
    if len(delta) == 4 or not is_unet_3x3(key):
        return delta
    return None


def tells_kernel(m: LoraModule, shape) -> bool:
    """Whether `shape` (`weight_shape(m)`) is known rather than read off flattened LoHa/LoKr tensors, which
    look the same for a Linear and a 1x1 conv."""
    return m.shape is not None or m.kind == "lora" or (shape is not None and len(shape) == 4)


def shapes_agree(a, a_flat, b, b_flat) -> bool:
    """Whether two modules (full shapes or None, and their flat shapes) adapt weights of one shape."""
    if a_flat != b_flat:
        return False
    return a is None or b is None or squeezed(a) == squeezed(b)


def fitted_layer(layer, m: LoraModule, key: str):
    """The Linear / Conv2d that `m` adapts (PEFT's wrapper unwrapped); ModelMismatchError naming `key` when
    the layer is missing or `m` (its delta, kernel or DoRA magnitude) does not fit its weight."""
    return fit_to_layer(layer, m, key)[0]
