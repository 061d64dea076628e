"""An exponential moving average (EMA) of the LoRA weights (`ema_decay`; OneTrainer and SimpleTuner have one).

Every trainable adapter parameter (LoRA, LoHa, LoKr, DoRA's magnitude: whatever the optimizer trains) has a
float32 shadow copy, started from the weights at the start of training and updated after each optimizer step k
(k = 1, 2, ...):  ema = decay_k * ema + (1 - decay_k) * weight,  with decay_k = ema_decay, or with `ema_warmup`
(the default) decay_1 = 0 (the first step copies the weights) and decay_k = min(ema_decay, k / (9 + k)), the
usual warm-up (diffusers' EMAModel, which does the arithmetic here). The shadow is saved as
`<name>-ema.safetensors` beside every save, in the training state (`ema.safetensors`, resumed bit-identically),
and swapped into the models for samples (`ema_for_samples`) and the validation loss (`ema_for_validation`).
"""

import contextlib
import logging

import torch
from diffusers.training_utils import EMAModel

from lora_sd.errors import ConfigError, FormatError

logger = logging.getLogger(__name__)


class _EMAModel(EMAModel):
    """diffusers' EMAModel always warms up; without `warmup` the decay is ema_decay from the first step."""

    warmup = True

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) if self.warmup else self.decay


def trained_parameters(accelerator, models: dict) -> dict:
    """`<part>.<parameter name>` -> every trainable parameter of the (unwrapped) models, in a fixed order."""
    return {f"{part}.{name}": p for part, m in models.items()
            for name, p in accelerator.unwrap_model(m).named_parameters() if p.requires_grad}


class LoraEma:
    """The EMA of `params` (name -> parameter); `step()` after each optimizer step."""

    def __init__(self, params: dict, decay: float, warmup: bool = True):
        self.names, self.params = list(params), list(params.values())
        self.ema = _EMAModel(self.params, decay=decay)
        self.ema.warmup = warmup
        self.ema.shadow_params = [p.detach().float().clone() for p in self.params]  # float32 whatever the weights

    @property
    def steps(self) -> int:
        return self.ema.optimization_step

    def step(self):
        self.ema.step(self.params)

    def shadow(self) -> dict:
        """name -> the EMA tensor (float32)."""
        return dict(zip(self.names, self.ema.shadow_params))

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in the models inside the block (cast to the weights' dtype); the trained ones after."""
        self.ema.store(self.params)
        try:
            self.ema.copy_to(self.params)
            yield
        finally:
            self.ema.restore(self.params)

    # --- a part of the training state (state_parts.py) --------------------------------------------------------

    def state_dict(self) -> dict:
        return {"optimization_step": self.ema.optimization_step, "decay": self.ema.decay,
                "warmup": self.ema.warmup, "shadow": self.shadow()}

    def load_state_dict(self, tree, path):
        from lora_sd.training.checkpoint import counter

        shadow = tree.get("shadow") if isinstance(tree, dict) else None
        if not isinstance(shadow, dict) or not all(isinstance(v, torch.Tensor) for v in shadow.values()):
            raise FormatError(f"{path}: not an EMA state (no `shadow` table of tensors)")
        differ = sorted(shadow.keys() ^ set(self.names)) or [n for n, p in zip(self.names, self.params)
                                                            if shadow[n].shape != p.shape]
        if differ:
            raise ConfigError(f"`resume` {path.parent}: the saved EMA does not fit this run's LoRA (network_dim, "
                              f"network_args or trained parts changed?): first difference at {differ[0]}")
        try:
            steps = counter(tree, "optimization_step")
        except (ValueError, KeyError) as e:
            raise FormatError(f"{path}: {e}") from None
        if (tree.get("decay"), tree.get("warmup")) != (self.ema.decay, self.ema.warmup):
            logger.info("%s: saved with ema_decay %s (warm-up %s); continuing with %s (warm-up %s)", path,
                        tree.get("decay"), tree.get("warmup"), self.ema.decay, self.ema.warmup)
        self.ema.shadow_params = [shadow[n].to(p.device, torch.float32, copy=True) for n, p in
                                  zip(self.names, self.params)]
        self.ema.optimization_step = steps

    def missing(self, folder):
        logger.warning("`resume` %s: the state holds no EMA (saved without ema_decay); the EMA starts from the "
                       "resumed weights", folder)
        self.ema.shadow_params = [p.detach().float().clone() for p in self.params]
        self.ema.optimization_step = 0


def ema_weights(ema: LoraEma | None, wanted: bool):
    """The EMA weights swapped in when `wanted` and there is an EMA; the trained weights otherwise."""
    return ema.swapped_in() if ema is not None and wanted else contextlib.nullcontext()
