"""train(cfg): LoRA training for Stable Diffusion 1.x / 2.x / XL, as a recipe in three parts (setup: setup.py).

The model families differ only in data: the parts trained (SDXL: two text
encoders), the text conditioning (text.py) and SDXL's pooled/size conditioning
of the U-Net (noise.compute_loss); this loop is the same for all.

`LoraTraining(cfg)`, in the shape of a torchtune recipe:
  setup()   accelerator -> base model -> LoRA adapters -> data -> optimizer and
            schedule -> accelerate.prepare -> resume -> outputs (config, trackers);
  loop()    for each batch: noise, timesteps, text conditioning, U-Net
            prediction, loss, backward, step; saves, samples and logs at their
            intervals (`_train_step`, `_after_step`, `_end_epoch`);
  finish()  the final save and the result;
  cleanup() progress bar and trackers, always.
`train(cfg)` runs them in that order. The run's counters live in
`self.progress` (saved with the training state); every save goes through
`save()`, which checks the weights first. Each step runs the LoRA at
`network_multiplier` x its dataset's `network_multiplier` (sd-scripts'
set_multiplier); `vae_batch_size` images share a VAE call when caching latents.
Beside the loop: saves, samples and the end (saving.py, mixed in), the
validation loss (validation.py), the EMA of the LoRA weights (ema.py) and the
removal of older saves (retention.py).

Refused with a clear message (exit 2 from the recipe, nothing written):
fp16 on a machine without CUDA, xformers when not installed, an unwritable
`output_dir` (a read-only folder, a path under a file), both
`network_train_*_only` set (at config load), a missing model or dataset, and
a NaN/inf loss (stops at that step; the last good save is kept), and
non-finite LoRA weights at a save (checked before every save: no file with
NaN/inf weights is ever written).
"""

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_sd.data.masks import check_mask_options
from lora_sd.errors import ConfigError, TrainingError
from lora_sd.io import atomic_path, check_writable_folder
from lora_sd.training import checkpoint, fused_backward, optim, text_cache
from lora_sd.training.compile import compiled_forward
from lora_sd.training.ema import LoraEma, ema_weights, trained_parameters
from lora_sd.training.interrupt import StopRequest, stop_on_ctrl_c
from lora_sd.training.metadata import training_metadata
from lora_sd.training.noise import compute_loss
from lora_sd.training.network import (check_attention, check_fp8, dropout_rng, lora_strength, network_spec,
                                      text_encoders, trained_parts)
from lora_sd.training.regularize import apply_max_norm
from lora_sd.training.resolved_config import config_toml
from lora_sd.training.sampling import read_prompts
from lora_sd.training.setup import load_model, make_accelerator, seed_everything
from lora_sd.training.saving import SavesAndEnd
from lora_sd.training.text import conditioning
from lora_sd.training.validation import Validation

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    lora_path: Path | None
    steps: int
    epochs: int
    version: str
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    validation: list[tuple] = field(default_factory=list)  # (step | epoch, number, validation loss)
    unet: object = None  # the trained models (unwrapped, adapters on): for checks in Python
    text_encoder: object = None
    text_encoder_2: object = None  # SDXL


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The noise/timestep RNG of one micro-batch: a function of where we are, so resume needs no RNG state."""
    return torch.Generator().manual_seed((((seed * 131 + rank) * 1_000_003 + step) * 1009 + micro) % 2**63)


def _every(n, count) -> bool:
    return bool(n) and count % n == 0


def train(cfg) -> TrainResult:
    """Train a LoRA as `cfg` says: setup -> loop -> finish; cleanup in any case. A Ctrl-C during loop or finish
    stops at the next optimizer step with the LoRA and state saved (TrainingInterrupted; see interrupt.py)."""
    run = LoraTraining(cfg)
    try:
        run.setup()
        with stop_on_ctrl_c() as run.stop:
            run.loop()
            return run.finish()
    finally:
        run.cleanup()


class LoraTraining(SavesAndEnd):
    """One training run. `setup()` sets the attributes; `loop()` and `save()` move `progress` and `result`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.accelerator = None
        self.bar = None
        self.epoch_losses: list[float] = []
        self.stop = StopRequest()  # train() puts one set by Ctrl-C here
        self.stopped = False
        self.ema = None
        self.bar_values = {}  # shown in the progress bar after loss and lr (e.g. the last validation loss)

    # --- setup ------------------------------------------------------------------------------------------

    def setup(self):
        """Devices, base model with LoRA, data, optimizer, schedule, resume, and the outputs written at start."""
        cfg = self.cfg
        check_attention(cfg)
        check_fp8(cfg)
        text_cache.check_cacheable(cfg)
        check_mask_options(cfg)
        check_writable_folder(cfg.output_dir, f"`output_dir` {cfg.output_dir}")
        if cfg.logging_dir:  # TensorBoard's writer fails later with an AttributeError traceback
            check_writable_folder(cfg.logging_dir, f"`logging_dir` {cfg.logging_dir}")
        checkpoint.refuse_outputs_over_inputs(cfg)
        if cfg.resume:  # a bad state folder is refused before the model loads
            checkpoint.check_state_folder(cfg.resume)
        self.prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
        self.accelerator = make_accelerator(cfg)
        seed_everything(cfg, self.accelerator)
        self.model, self.weight_dtype = load_model(cfg, self.accelerator.device)
        self.unet = self.model.unet
        self.encoders = text_encoders(self.model)  # {"text_encoder": te1, "text_encoder_2": te2 (SDXL)}
        self.trained = trained_parts(self.model, cfg)
        spec = network_spec(cfg)  # without dropouts nothing in a step draws from the global RNG: no reseeding
        self.draws_dropout = bool(spec.dropout or spec.rank_dropout or spec.module_dropout)
        for m in self.trained.values():
            m.train()
        self.data = self._setup_data()
        self._setup_schedule_length()
        self._setup_optimization()
        self.validation = Validation.of(cfg, self.data, self.accelerator)
        if cfg.ema_decay is not None:
            self.ema = LoraEma(trained_parameters(self.accelerator, self.models), cfg.ema_decay, cfg.ema_warmup)
        self._setup_progress()
        self._setup_outputs()

    def _setup_data(self):
        from lora_sd.data import build_train_data, pinned_transfers
        from lora_sd.data.latents import VaeEncoder

        cfg = self.cfg
        if cfg.cache_latents_to_disk and not cfg.cache_latents:
            logger.info("cache_latents_to_disk is set, so latents are cached (cache_latents), as in sd-scripts")
        encoder = VaeEncoder(self.model.vae, cfg.seed) if cfg.cache_latents or cfg.cache_latents_to_disk else None
        with self.accelerator.main_process_first():  # the main process fills a disk cache; the others read it
            return build_train_data(cfg.datasets, seed=cfg.seed, prior_loss_weight=cfg.prior_loss_weight,
                                    max_data_loader_n_workers=cfg.max_data_loader_n_workers,
                                    persistent_data_loader_workers=cfg.persistent_data_loader_workers,
                                    cache_latents=cfg.cache_latents, cache_latents_to_disk=cfg.cache_latents_to_disk,
                                    encode_fn=encoder, vae_id=encoder.vae_id if encoder else "",
                                    vae_batch_size=cfg.vae_batch_size, validation_split=cfg.validation_split,
                                    validation_seed=cfg.validation_seed, device_type=pinned_transfers(self.accelerator))

    def _setup_schedule_length(self):
        """Optimizer steps per epoch and in all (max_train_epochs, when given, decides)."""
        cfg, processes = self.cfg, self.accelerator.num_processes
        batches_per_process = math.ceil(self.data.batches_per_epoch / processes)
        self.steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        self.max_train_steps = cfg.max_train_steps
        if cfg.max_train_epochs:
            self.max_train_steps = cfg.max_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

    def _setup_optimization(self):
        """Optimizer and schedule over the LoRA parameters, then accelerate.prepare (DDP, precision, sharding)."""
        cfg, acc = self.cfg, self.accelerator
        groups, self.group_names = optim.param_groups(cfg, self.trained)  # per part (LoRA+, block lr weights)
        optimizer, self.optimizer_name = optim.build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate,
                                                               cfg.optimizer_args)
        lr_scheduler = optim.build_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps,
                                             total_steps=self.max_train_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                             power=cfg.lr_scheduler_power, num_processes=acc.num_processes)
        prepared = acc.prepare(*self.trained.values(), optimizer, self.data.dataloader, lr_scheduler)
        self.models = dict(zip(self.trained, prepared[:len(self.trained)]))
        self.optimizer, self.dataloader, self.lr_scheduler = prepared[len(self.trained):]
        forward = compiled_forward(cfg, self.models)  # torch_compile: the trained parts' forward; models stay plain
        self.unet = forward.get("unet", self.unet)
        self.encoders = {name: forward.get(name, m) for name, m in self.encoders.items()}
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.fused = fused_backward.attach(cfg, self.optimizer)  # fused_backward_pass: steps inside backward
        self._setup_text_conditioning()

    def _setup_text_conditioning(self):
        """captions -> (context, pooled): encoded each step (text encoders trained), else once per caption;
        `cache_text_encoder_outputs`: every caption up front, then the text encoders leave the device."""
        cfg, model = self.cfg, self.model
        tokenizers = [model.tokenizer] + ([model.tokenizer_2] if model.tokenizer_2 is not None else [])
        to_disk = cfg.cache_text_encoder_outputs_to_disk
        self.text_conditioning = conditioning(list(self.encoders.values()), tokenizers, cfg.max_token_length,
                                              cfg.clip_skip, cached=not cfg.train_text_encoder,
                                              cache_dir=text_cache.default_text_cache_dir() if to_disk else None,
                                              weighted=cfg.weighted_captions)
        self.text_encoders_offloaded = False
        if not (cfg.cache_text_encoder_outputs or to_disk):
            return
        with self.accelerator.main_process_first(), self.accelerator.autocast():  # the main process fills the disk
            self.text_conditioning.fill(self.data.captions())
        for m in self.encoders.values():  # sd-scripts moves them to the CPU too; back on the device to sample
            m.to("cpu")
        self.text_encoders_offloaded = True

    def _setup_progress(self):
        """The counters saved with the training state, restored from `resume`."""
        self.progress = checkpoint.Progress()
        self.state = checkpoint.TrainingState(self.accelerator, self.models, self.optimizer, self.lr_scheduler,
                                              self.progress, {"ema": self.ema} if self.ema else {})
        if self.cfg.resume:
            checkpoint.load_training_state(self.state, self.cfg.resume)
            done, batches = self.progress.batches_in_epoch, len(self.dataloader)
            if done > batches:  # the epoch could never end: every later epoch would skip all its batches
                raise ConfigError(f"`resume` {self.cfg.resume}: the state is {done} batches into its epoch, but this "
                                  f"run's epochs have {batches} (fewer images, or a larger batch size or process "
                                  "count?); resume with the dataset and batch size it was saved with")

    def _setup_outputs(self):
        """Metadata of every save, the resolved config beside the outputs, trackers, and the result to fill."""
        cfg, acc = self.cfg, self.accelerator
        total_batch_size = cfg.datasets[0].batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        self.metadata = training_metadata(cfg, self.data, total_batch_size=total_batch_size,
                                          max_train_steps=self.max_train_steps, num_epochs=self.num_epochs,
                                          optimizer_name=self.optimizer_name, started_at=time.time())
        if acc.is_main_process:
            checkpoint.remove_stale_temporaries(cfg.output_dir, cfg.output_name)  # left by a killed run
            config = Path(cfg.output_dir) / f"{cfg.output_name}-config.toml"
            with atomic_path(config) as tmp:
                tmp.write_text(config_toml(cfg), encoding="utf-8")
        if cfg.logging_dir:
            acc.init_trackers("network_train")
        self.result = TrainResult(None, self.progress.global_step, self.progress.epoch, self.model.version)

    # --- the loop ---------------------------------------------------------------------------------------

    def loop(self):
        """Train until max_train_steps, epoch by epoch (a resumed run starts inside its epoch)."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.bar = tqdm(total=self.max_train_steps, initial=self.progress.global_step, desc="steps",
                        disable=not acc.is_main_process)
        logger.info("training %s for %d steps (%d epochs of %d steps), batch %s x %d process(es) x %d accumulation",
                    "+".join(self.trained), self.max_train_steps, self.num_epochs, self.steps_per_epoch,
                    cfg.datasets[0].batch_size, acc.num_processes, cfg.gradient_accumulation_steps)
        while self.progress.global_step < self.max_train_steps and not self.stopped:
            self._run_epoch()
        self.bar.close()

    def _run_epoch(self):
        progress = self.progress
        epoch, skip = progress.epoch, progress.batches_in_epoch
        self.data.set_epoch(epoch)
        for batch in self.accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader:
            loss = self._train_step(batch)
            progress.batches_in_epoch += 1
            self.epoch_losses.append(loss)
            if not self.accelerator.sync_gradients:
                continue
            progress.global_step += 1
            self._after_step(loss)
            # after a Ctrl-C, stop here (the last step ends the run as usual); every process gets the same answer
            self.stopped = progress.global_step < self.max_train_steps and self.stop.agreed(self.accelerator)
            if progress.global_step >= self.max_train_steps or self.stopped:
                break
        if self.stopped:  # the state resumes here, where the epoch's saves and samples are still due
            return
        if progress.batches_in_epoch == len(self.dataloader):  # the epoch ran to its end (the state resumes after it)
            self._end_epoch(epoch)

    def _train_step(self, batch) -> float:
        """One micro-batch: loss, backward and, once accumulation is complete, the optimizer step."""
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        generator = step_generator(cfg.seed, acc.process_index, progress.global_step, progress.batches_in_epoch)
        rng = dropout_rng(generator.initial_seed() + 1, acc.device) if self.draws_dropout else nullcontext()
        with acc.accumulate(*self.models.values()), lora_strength(self.models.values(), self._strength(batch)), \
                rng:  # another stream than the noise
            loss = self._loss(batch, cfg, generator)
            self._check_loss(loss)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm and not self.fused:  # fused: clipped, stepped and freed
                optim.clip_grad_norm(acc, self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients and cfg.scale_weight_norms:
                self.max_norms = apply_max_norm(self.models.values(), cfg.scale_weight_norms)
        return loss.item()

    def _loss(self, batch, cfg, generator):
        """The loss of one batch (training, or validation with its own cfg and generator)."""
        with self.accelerator.autocast():
            return compute_loss(batch, unet=self.unet, text_conditioning=self.text_conditioning, vae=self.model.vae,
                                scheduler=self.model.scheduler, cfg=cfg, generator=generator,
                                weight_dtype=self.weight_dtype)

    def _validation_loss(self, batch, cfg, generator):
        with lora_strength(self.models.values(), self._strength(batch)):
            return self._loss(batch, cfg, generator)

    def validate(self, when: str, number: int):
        """Score the validation batches (validation.py); log, show and record the loss. `when`: step | epoch."""
        models = list(self.models.values())
        for m in models:
            m.eval()  # the adapters' dropouts off
        try:
            with ema_weights(self.ema, self.cfg.ema_for_validation):
                loss = self.validation.loss(self._validation_loss)
        finally:
            for m in models:
                m.train()
        self.result.validation.append((when, number, loss))
        self.bar_values["val_loss"] = f"{loss:.4f}"
        if self.cfg.logging_dir:
            train = sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else loss
            self.accelerator.log({f"loss/validation/{when}_average": loss,
                                  f"loss/validation/{when}_divergence": loss - train}, step=number)

    def _strength(self, batch) -> float:
        """The LoRA's strength for this batch: network_multiplier x its dataset's (sd-scripts' set_multiplier)."""
        per_sample = batch["network_multipliers"]
        if not torch.all(per_sample == per_sample[0]):  # the bucket sampler never mixes datasets in a batch
            raise ValueError("a batch mixes datasets of different network_multiplier")
        return self.cfg.network_multiplier * per_sample[0].item()

    def _check_loss(self, loss):
        """A NaN/inf loss on any process stops the run at this step (nothing more is saved)."""
        if torch.isfinite(self.accelerator.gather(loss.detach()[None])).all():
            return
        raise TrainingError(f"the loss is {loss.item()} at step {self.progress.global_step + 1} "
                            f"(epoch {self.progress.epoch + 1}); training stopped. Last good save: "
                            f"{self._last_save()}. Try a lower learning_rate, or mixed_precision \"no\"/\"bf16\"")

    def _after_step(self, loss: float):
        """After each optimizer step: progress bar, logs, and the samples and saves due at this step."""
        cfg, step = self.cfg, self.progress.global_step
        if self.ema is not None:
            self.ema.step()
        self.result.losses.append(loss)
        group_lrs = optim.current_lrs(self.optimizer)
        self.bar.update(1)
        norms = self.max_norms if cfg.scale_weight_norms else {}  # sd-scripts' max-norm figures
        self.bar_values.update({k: f"{v:.4g}" for k, v in norms.items()})
        if cfg.logging_dir:
            logs = {"loss/current": loss, "loss/average": sum(self.epoch_losses) / len(self.epoch_losses)}
            logs.update({f"lr/{n}": lr for n, lr in zip(self.group_names, group_lrs)})
            logs.update({f"max_norm/{k}": v for k, v in norms.items()})
            self.accelerator.log(logs, step=step)
        if self.validation and self.validation.due_at_step(step):
            self.validate("step", step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{group_lrs[-1]:.2e}", **self.bar_values)
        if self.prompts and _every(cfg.sample_every_n_steps, step):
            self.sample()
        if _every(cfg.save_every_n_steps, step) and step < self.max_train_steps:
            self.save(step=step)

    def _end_epoch(self, epoch: int):
        """An epoch ran to its end: count it, then the saves and samples due every n epochs."""
        cfg, done = self.cfg, epoch + 1
        if self.validation and self.validation.due_at_epoch(done):
            self.validate("epoch", done)
        self.progress.epoch, self.progress.batches_in_epoch, self.epoch_losses = done, 0, []
        if _every(cfg.save_every_n_epochs, done) and done < self.num_epochs:
            self.save(epoch=done)
        if self.prompts and _every(cfg.sample_every_n_epochs, done):
            self.sample()

    def cleanup(self):
        """Close the progress bar and the trackers (also after an error)."""
        if self.bar is not None:
            self.bar.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
