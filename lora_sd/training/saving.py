"""Saves, samples and the end of a run: the part of `LoraTraining` (loop.py) that writes its outputs.

`save()` writes the LoRA (and, with `ema_decay`, its EMA as `<name>-ema` beside it) after checking that its
weights are finite, the training state when asked, and removes what `save_last_n_*` no longer keeps
(retention.py); `sample()` draws the sample prompts (with the EMA weights when `ema_for_samples`); `finish()`
makes the final save, or after a Ctrl-C the `-interrupted` one.
"""

from pathlib import Path

import torch

from lora_sd.errors import TrainingError, TrainingInterrupted
from lora_sd.training import checkpoint, retention
from lora_sd.training.ema import ema_weights
from lora_sd.training.metadata import at_save
from lora_sd.training.sampling import sample_images


class SavesAndEnd:
    """Mixed into LoraTraining: uses its cfg, accelerator, models, params, progress, result, state and ema."""

    def _check_weights(self):
        """Before every save: a non-finite LoRA weight (a NaN/inf update) stops the run, and nothing is written."""
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in self.params)
        bad = int(self.accelerator.gather(torch.tensor([bad], device=self.accelerator.device)).sum())
        if bad:
            raise TrainingError(f"the LoRA weights hold {bad} non-finite value(s) at step {self.progress.global_step} "
                                f"(epoch {self.progress.epochs_begun}); training stopped without saving them. Last "
                                f"good save: {self._last_save()}. Try a lower learning_rate, or mixed_precision "
                                "\"no\"/\"bf16\"")

    def _last_save(self) -> str:
        return str(self.result.saved[-1]) if self.result.saved else "none (nothing was saved yet)"

    def save(self, *, epoch=None, step=None, state: bool | None = None, interrupted=False) -> Path:
        """Save the LoRA under its name for `epoch`/`step`/`interrupted` (none: the final name), and the training
        state when `state` (default: `save_state`). Returns the LoRA's path."""
        cfg, acc = self.cfg, self.accelerator
        self._check_weights()
        meta = at_save(self.metadata, steps=self.progress.global_step, epoch=self.progress.epochs_begun)
        path = checkpoint.save_lora_file(acc, self.models, cfg, meta, version=self.model.version,
                                         unet_config=self.model.unet.config, epoch=epoch, step=step,
                                         interrupted=interrupted)
        self.result.saved.append(path)
        if self.ema is not None:  # the EMA weights beside the trained ones: <name>-ema
            with self.ema.swapped_in():
                checkpoint.save_lora_file(acc, self.models, cfg, meta, version=self.model.version, epoch=epoch,
                                          step=step, unet_config=self.model.unet.config, interrupted=interrupted,
                                          suffix="-ema")
        if cfg.save_state if state is None else state:
            checkpoint.save_training_state(self.state, Path(cfg.output_dir)
                                           / checkpoint.state_dir_name(cfg, epoch, step, interrupted))
        if acc.is_main_process and (epoch is not None or step is not None):
            retention.remove_old_saves(cfg, epoch=epoch, step=step)
        return path

    def sample(self):
        device = self.accelerator.device
        if self.text_encoders_offloaded:
            for m in self.encoders.values():
                m.to(device)
        try:
            with ema_weights(self.ema, self.cfg.ema_for_samples):
                self.result.samples += sample_images(self.accelerator, self.model, models=self.encoders | self.models,
                                                     cfg=self.cfg, prompts=self.prompts,
                                                     step=self.progress.global_step)
        finally:
            if self.text_encoders_offloaded:
                for m in self.encoders.values():
                    m.to("cpu")

    def finish(self):
        """The final save (with the state when save_state or save_state_on_train_end), then the result (with the
        trained models, unwrapped, for checks in Python); after a Ctrl-C, the `-interrupted` save instead."""
        cfg, acc, result = self.cfg, self.accelerator, self.result
        with_state = cfg.save_state or cfg.save_state_on_train_end  # sd-scripts: a state at the end, even without
        if self.stopped:
            self._stop_interrupted(with_state)
        result.lora_path = self.save(state=with_state)
        result.steps, result.epochs = self.progress.global_step, self.progress.epochs_begun
        plain = {"keep_torch_compile": False}  # torch_compile: the modules, not their compiled forward
        result.unet = acc.unwrap_model(self.unet, **plain)
        result.text_encoder = acc.unwrap_model(self.encoders["text_encoder"], **plain)
        if "text_encoder_2" in self.encoders:
            result.text_encoder_2 = acc.unwrap_model(self.encoders["text_encoder_2"], **plain)
        return result

    def _stop_interrupted(self, with_state: bool):
        """After a Ctrl-C: save the LoRA so far under `-interrupted` names (never the final one), then stop."""
        cfg, step = self.cfg, self.progress.global_step
        lora = self.save(state=with_state, interrupted=True)
        where = f"interrupted (Ctrl-C) after step {step} of {self.max_train_steps}: the LoRA so far is {lora}"
        if not with_state:
            raise TrainingInterrupted(f"{where}; no training state was saved (save_state is off): it cannot resume")
        state = Path(cfg.output_dir) / checkpoint.state_dir_name(cfg, interrupted=True)
        raise TrainingInterrupted(f"{where}, its training state {state}; to continue, run the same command with "
                                  f"--resume {state}")

