"""sd-scripts' `fused_backward_pass`: each LoRA weight is stepped inside backward, as soon as its gradient is
complete, and its gradient freed at once, so that the gradients of all weights never exist together.

sd-scripts (sdxl_train.py) registers a post-accumulate-grad hook on every trained weight that clips that
weight's gradient by `max_grad_norm` (its own norm: there is no global norm before all gradients exist),
steps the optimizer on that weight alone and sets its gradient to None; it allows it with
gradient_accumulation_steps 1 only. Here the run keeps its one optimizer (so the training state, the
learning-rate schedule and resume are what they are without the option): the hook shows the optimizer a
param_groups list holding only the weight's group with only that weight, calls its step(), and puts the
groups back. That is exact for optimizers whose update of a weight reads only that weight, its gradient
and its own state (AdamW, AdamW8bit, Lion, SGD, Adafactor: config/validate.py PER_WEIGHT_OPTIMIZERS); the
rest, and what cannot be exact (accumulation, several processes: DDP reduces a gradient after the hook has
used it; fp16's scaler: it decides on all gradients together), are refused in one line before the model
loads. The loop's own optimizer.step() then finds no gradient left and changes nothing; the schedule still
steps once per step.
"""

import logging

import torch

from lora_sd.errors import ConfigError

logger = logging.getLogger(__name__)


def check_processes(cfg, num_processes: int):
    """Refuse fused_backward_pass with more than one process (before the model loads)."""
    if cfg.fused_backward_pass and num_processes > 1:
        raise ConfigError(f"`fused_backward_pass` runs on one process, this run has {num_processes}: DDP averages a "
                          "gradient over the processes only after the hook would have stepped it; train on one "
                          "process, or remove the option")


class FusedBackward:
    """The hooks on every weight of `optimizer`; `remove()` takes them off."""

    def __init__(self, optimizer, max_grad_norm: float):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self.max_grad_norm = max_grad_norm
        # a weight's group by index: loading a training state (optimizer.load_state_dict) makes new group dicts
        self.group_of = {p: i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.group_of]

    def _step(self, p: torch.Tensor):
        if self.max_grad_norm:  # sd-scripts: each weight's gradient clipped by its own norm
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        groups = self.optimizer.param_groups
        group = groups[self.group_of[p]]
        params = group["params"]
        self.optimizer.param_groups = [group]  # the optimizer sees this weight alone
        group["params"] = [p]
        try:
            self.optimizer.step()
        finally:
            group["params"] = params
            self.optimizer.param_groups = groups
        p.grad = None

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attach(cfg, optimizer) -> FusedBackward | None:
    """The hooks when `fused_backward_pass` is set (the config and the process count are checked already)."""
    if not cfg.fused_backward_pass:
        return None
    fused = FusedBackward(optimizer, cfg.max_grad_norm)
    logger.info("fused_backward_pass: %d weights stepped inside backward", len(fused.handles))
    return fused
