"""The validation loss (sd-scripts' validation_split, validate_every_n_steps/epochs, max_validation_steps).

The images held out by `validation_split` (data.index.split_validation; never regularization images) are
cut into fixed batches, the same at every validation. Each batch is scored at the fixed timesteps sd-scripts
uses (four, evenly inside [min_timestep, max_timestep]: 200, 400, 600, 800 by default) with the training loss
(compute_loss), its noise (and VAE sample, when latents are not cached) from `validation_generator(seed,
batch, timestep index)`: the same every time, so curves compare across validations and runs. No gradients,
the adapters in eval mode (dropouts off), optionally with the EMA weights (`ema_for_validation`). The batches
are shared out over the processes (batch i to process i mod n, at most `max_validation_steps` each) and the
losses gathered: the result is the mean over all batches x timesteps, whatever the number of processes.

When: every `validate_every_n_steps` steps, and at the end of every epoch (every `validate_every_n_epochs`-th
when given). Logged (TensorBoard) as sd-scripts: loss/validation/step_average and step_divergence (minus the
epoch's average training loss) at the step, loss/validation/epoch_average and epoch_divergence at the epoch.
"""

import dataclasses
import hashlib
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

NUM_TIMESTEPS = 4


def validation_timesteps(min_timestep: int, max_timestep: int) -> list[int]:
    """sd-scripts': np.linspace(min, max, 4 + 2, dtype=int) without its ends."""
    return [int(t) for t in np.linspace(min_timestep, max_timestep, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


def validation_generator(seed: int, batch: int, timestep_index: int) -> torch.Generator:
    """The noise of validation batch `batch` at its `timestep_index`-th timestep: a function of these only."""
    digest = hashlib.sha256(f"lora_sd validation:{seed}:{batch}:{timestep_index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


class Validation:
    """This process's share of the validation batches, and when to score them."""

    def __init__(self, cfg, data, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
        batches = data.validation_batches
        self.indices = list(range(accelerator.process_index, len(batches), accelerator.num_processes))
        self.indices = self.indices[:cfg.max_validation_steps or None]
        self.loader = data.validation_loader([batches[i] for i in self.indices])
        self.timesteps = validation_timesteps(cfg.min_timestep, cfg.max_timestep)
        # compute_loss draws timesteps from [min_timestep, max_timestep): one value each
        self.configs = [dataclasses.replace(cfg, min_timestep=t, max_timestep=t + 1) for t in self.timesteps]
        logger.info("validation: %d batches (%d on this process) at timesteps %s", len(batches),
                    len(self.indices), self.timesteps)

    @classmethod
    def of(cls, cfg, data, accelerator):
        """The run's validation, or None when nothing is held out."""
        asked = [k for k in ("validation_split", "validate_every_n_steps", "validate_every_n_epochs",
                             "max_validation_steps") if getattr(cfg, k)]
        if not data.validation_batches:
            if asked or any(ds.validation_split for ds in cfg.datasets):
                logger.warning("no image is held out for validation (validation_split 0, or too few images per "
                               "subset): no validation loss, although %s is set", ", ".join(asked) or
                               "a dataset's validation_split")
            return None
        return cls(cfg, data, accelerator)

    def due_at_step(self, step: int) -> bool:
        n = self.cfg.validate_every_n_steps
        return bool(n) and step % n == 0

    def due_at_epoch(self, epochs_done: int) -> bool:
        n = self.cfg.validate_every_n_epochs
        return n is None or epochs_done % n == 0

    @torch.no_grad()
    def loss(self, batch_loss) -> float:
        """The mean of `batch_loss(batch, cfg, generator)` over all processes' batches x the timesteps."""
        total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)  # sum, count
        for index, batch in zip(self.indices, self.loader):
            for j, cfg in enumerate(self.configs):
                total[0] += batch_loss(batch, cfg, validation_generator(self.seed, index, j)).double()
                total[1] += 1
        total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()
