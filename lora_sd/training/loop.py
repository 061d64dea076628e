"""train(cfg): LoRA training for Stable Diffusion 1.x / 2.x, read top to bottom.

setup: accelerator -> base model -> LoRA adapters -> data -> optimizer and
schedule -> accelerate.prepare -> resume; then the loop: for each batch,
noise, timesteps, text conditioning, U-Net prediction, loss, backward, step;
saves, samples and logs at their intervals; a final save.

Refused with a clear message (exit 2 from the recipe, nothing written):
fp16 on a machine without CUDA, xformers when not installed, both
`network_train_*_only` set (at config load), a missing model or dataset, and
a NaN/inf loss (stops at that step; the last good save is kept).
"""

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_sd.demo import resolve_demo_path
from lora_sd.errors import ConfigError, TrainingError
from lora_sd.io import atomic_path
from lora_sd.training import checkpoint, noise, optim
from lora_sd.training.metadata import at_save, training_metadata
from lora_sd.training.network import add_network, check_attention, enable_gradient_checkpointing, set_attention
from lora_sd.training.sampling import read_prompts, sample_images
from lora_sd.training.text import conditioning

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
    unet: object = None  # the trained models (unwrapped, adapters on): for checks in Python
    text_encoder: object = None


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    has_cuda = torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and not has_cuda:
        raise ConfigError('`mixed_precision = "fp16"` needs a CUDA GPU; on CPU use "bf16" or "no"')
    kwargs = {}
    if cfg.logging_dir:
        run = (cfg.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")
        kwargs = dict(log_with="tensorboard",
                      project_config=ProjectConfiguration(project_dir=str(Path(cfg.logging_dir) / run)))
    AcceleratorState._reset_state()  # a second run in one Python process may use another precision
    if cfg.train_text_encoder and cfg.clip_skip and cfg.clip_skip > 1:
        # the text encoder's last layers do not reach the U-Net: DDP must expect LoRA weights without gradients
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    # cpu=True on a GPU-less machine makes `accelerate launch --multi_gpu` run DDP over gloo (see DESIGN.md)
    return Accelerator(cpu=not has_cuda, mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps, **kwargs)


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The noise/timestep RNG of one micro-batch: a function of where we are, so resume needs no RNG state."""
    return torch.Generator().manual_seed((((seed * 131 + rank) * 1_000_003 + step) * 1009 + micro) % 2**63)


def compute_loss(batch, *, unet, text_conditioning, vae, scheduler, cfg, generator, weight_dtype):
    """The diffusion loss of one batch (sd-scripts' objective; see lora_sd.training.noise)."""
    device = next(vae.parameters()).device
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # a float32 VAE (as the latent cache)
            latents = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist.sample(generator)
    latents = (latents * vae.config.scaling_factor).float()  # [B, 4, h, w]
    eps = noise.sample_noise(latents, cfg.noise_offset, generator)
    timesteps = noise.sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, generator, device)
    noisy = scheduler.add_noise(latents, eps, timesteps)
    hidden = text_conditioning(batch["captions"])  # [B, 77 (or 152/227), hidden]
    pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
    target = noise.target_for(scheduler, latents, eps, timesteps, cfg.v_parameterization)
    return noise.diffusion_loss(pred, target, batch["loss_weights"].to(device), scheduler, timesteps,
                                cfg.min_snr_gamma, cfg.v_parameterization)


def load_model(cfg, device):
    """(SDModel, weight dtype): the base model on `device`, frozen, the LoRA adapters added.

    The U-Net and text encoder are cast to the mixed-precision dtype; the VAE only
    encodes and stays float32 (sd-scripts' no_half_vae); LoRA weights are float32.
    """
    from lora_sd.models.load import load_base

    model = load_base(resolve_demo_path(cfg.pretrained_model_name_or_path), v2=cfg.v2,
                      v_parameterization=cfg.v_parameterization, model_config=cfg.model_config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for m in (model.unet, model.text_encoder, model.vae):
        m.requires_grad_(False)
        m.to(device, dtype=torch.float32 if m is model.vae else weight_dtype)
    set_attention(model.unet, cfg)
    add_network(model.unet, model.text_encoder, cfg)
    enable_gradient_checkpointing(model.unet, model.text_encoder, cfg)
    return model, weight_dtype


def _every(n, count) -> bool:
    return bool(n) and count % n == 0


def _seed(cfg, accelerator):
    if cfg.seed is None:
        from accelerate.utils import broadcast_object_list

        cfg.seed = broadcast_object_list([random.randint(0, 2**31 - 1)])[0]
        logger.info("seed not given: using %d", cfg.seed)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)


def train(cfg) -> TrainResult:
    from lora_sd.data import build_train_data
    from lora_sd.data.latents import vae_fingerprint

    # --- setup: devices, base model, LoRA ----------------------------------------------------------
    check_attention(cfg)
    prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
    accelerator = make_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    _seed(cfg, accelerator)
    model, weight_dtype = load_model(cfg, device)
    unet, text_encoder, vae, tokenizer = model.unet, model.text_encoder, model.vae, model.tokenizer
    scheduler = model.scheduler  # sd-scripts' DDPM training schedule (v_prediction with v_parameterization)
    trained = {name: m for name, m, on in (("text_encoder", text_encoder, cfg.train_text_encoder),
                                           ("unet", unet, cfg.train_unet)) if on}
    for m in trained.values():
        m.train()

    # --- data ----------------------------------------------------------------------------------------
    cache_gen = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def encode_fn(pixels):  # [B, 3, H, W] in [-1, 1] -> unscaled latents [B, 4, H/8, W/8]
        return vae.encode(pixels.to(device, torch.float32)).latent_dist.sample(cache_gen).cpu()

    with accelerator.main_process_first():  # the main process fills a disk cache; the others read it
        data = build_train_data(cfg.datasets, seed=cfg.seed, prior_loss_weight=cfg.prior_loss_weight,
                                max_data_loader_n_workers=cfg.max_data_loader_n_workers,
                                persistent_data_loader_workers=cfg.persistent_data_loader_workers,
                                cache_latents=cfg.cache_latents, cache_latents_to_disk=cfg.cache_latents_to_disk,
                                encode_fn=encode_fn, vae_id=vae_fingerprint(vae) if cfg.cache_latents else "")
    batches_per_process = math.ceil(data.batches_per_epoch / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
    max_train_steps = cfg.max_train_steps
    if cfg.max_train_epochs:
        max_train_steps = cfg.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # --- optimizer, schedule, accelerate ---------------------------------------------------------------
    lrs = {"text_encoder": cfg.text_encoder_lr, "unet": cfg.unet_lr}
    groups = [{"params": optim.trainable_parameters(m),
               "lr": cfg.learning_rate if lrs[name] is None else lrs[name]} for name, m in trained.items()]
    optimizer, optimizer_name = optim.build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate,
                                                      cfg.optimizer_args)
    lr_scheduler = optim.build_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps,
                                         total_steps=max_train_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                         power=cfg.lr_scheduler_power, num_processes=accelerator.num_processes)
    prepared = accelerator.prepare(*trained.values(), optimizer, data.dataloader, lr_scheduler)
    models = dict(zip(trained, prepared[:len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained):]
    unet, text_encoder = models.get("unet", unet), models.get("text_encoder", text_encoder)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    text_conditioning = conditioning(text_encoder, tokenizer, cfg.max_token_length, cfg.clip_skip,
                                     cached=not cfg.train_text_encoder)

    progress = checkpoint.Progress()
    accelerator.register_for_checkpointing(progress)
    accelerator.register_save_state_pre_hook(checkpoint.only_lora_weights)
    if cfg.resume:
        checkpoint.load_training_state(accelerator, cfg.resume)

    # --- outputs: metadata, resolved config, trackers, sample prompts ----------------------------------
    metadata = training_metadata(cfg, data, total_batch_size=cfg.datasets[0].batch_size * accelerator.num_processes
                                 * cfg.gradient_accumulation_steps, max_train_steps=max_train_steps,
                                 num_epochs=num_epochs, optimizer_name=optimizer_name, started_at=time.time())
    if main:
        with atomic_path(Path(cfg.output_dir) / f"{cfg.output_name}-config.toml") as tmp:
            tmp.write_text(checkpoint.config_toml(cfg), encoding="utf-8")
    if cfg.logging_dir:
        accelerator.init_trackers("network_train")
    result = TrainResult(None, progress.global_step, progress.epoch, model.version)

    def save(epoch=None, step=None):
        meta = at_save(metadata, steps=progress.global_step, epoch=progress.epochs_begun)
        path = checkpoint.save_lora_file(accelerator, unet, text_encoder, cfg, meta, version=model.version,
                                         epoch=epoch, step=step)
        result.saved.append(path)
        if cfg.save_state:
            checkpoint.save_training_state(accelerator, Path(cfg.output_dir) / checkpoint.state_dir_name(cfg, epoch, step))
        return path

    def sample():
        result.samples += sample_images(accelerator, model, unet=unet, text_encoder=text_encoder, cfg=cfg,
                                        prompts=prompts, step=progress.global_step)

    # --- the loop ------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=max_train_steps, initial=progress.global_step, desc="steps", disable=not main)
    logger.info("training %s for %d steps (%d epochs of %d steps), batch %s x %d process(es) x %d accumulation",
                "+".join(trained), max_train_steps, num_epochs, steps_per_epoch, cfg.datasets[0].batch_size,
                accelerator.num_processes, cfg.gradient_accumulation_steps)
    epoch_losses = []
    try:
        while progress.global_step < max_train_steps:
            epoch, skip = progress.epoch, progress.batches_in_epoch
            data.set_epoch(epoch)
            for batch in accelerator.skip_first_batches(dataloader, skip) if skip else dataloader:
                generator = step_generator(cfg.seed, accelerator.process_index, progress.global_step,
                                           progress.batches_in_epoch)
                with accelerator.accumulate(*models.values()):
                    with accelerator.autocast():
                        loss = compute_loss(batch, unet=unet, text_conditioning=text_conditioning, vae=vae,
                                            scheduler=scheduler, cfg=cfg, generator=generator,
                                            weight_dtype=weight_dtype)
                    if not torch.isfinite(accelerator.gather(loss.detach()[None])).all():
                        last = result.saved[-1] if result.saved else "none (nothing was saved yet)"
                        raise TrainingError(f"the loss is {loss.item()} at step {progress.global_step + 1} "
                                            f"(epoch {epoch + 1}); training stopped. Last good save: {last}. "
                                            "Try a lower learning_rate, or mixed_precision \"no\"/\"bf16\"")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.batches_in_epoch += 1
                epoch_losses.append(loss.item())
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                result.losses.append(loss.item())
                group_lrs = optim.current_lrs(optimizer)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{group_lrs[-1]:.2e}")
                if cfg.logging_dir:
                    logs = {"loss/current": loss.item(), "loss/average": sum(epoch_losses) / len(epoch_losses)}
                    logs.update({f"lr/{n.replace('_', '')}": lr for n, lr in zip(trained, group_lrs)})
                    accelerator.log(logs, step=progress.global_step)
                if prompts and _every(cfg.sample_every_n_steps, progress.global_step):
                    sample()
                if _every(cfg.save_every_n_steps, progress.global_step) and progress.global_step < max_train_steps:
                    save(step=progress.global_step)
                if progress.global_step >= max_train_steps:
                    break
            if progress.batches_in_epoch == len(dataloader):  # the epoch ran to its end (the state resumes after it)
                progress.epoch, progress.batches_in_epoch, epoch_losses = epoch + 1, 0, []
                if _every(cfg.save_every_n_epochs, epoch + 1) and epoch + 1 < num_epochs:
                    save(epoch=epoch + 1)
                if prompts and _every(cfg.sample_every_n_epochs, epoch + 1):
                    sample()
        bar.close()
        result.lora_path = save()
        result.steps, result.epochs = progress.global_step, progress.epochs_begun
        result.unet, result.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    finally:
        bar.close()
        accelerator.end_training()
    return result
