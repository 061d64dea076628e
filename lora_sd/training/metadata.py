"""The `ss_*` training metadata sd-scripts writes into a LoRA file (all values strings).

`training_metadata` is computed once at the start of a run; `at_save` adds
what changes at each save (steps, epoch, finish time). The network keys
(`ss_network_dim`, ...), `modelspec.*` and the `sshs_*` hashes are filled in
by the kohya writer (lora_sd.formats) from the weights themselves.
"""

import json
import time
import uuid
from pathlib import Path


def _s(value) -> str:
    return "None" if value is None else str(value)


def training_metadata(cfg, data, *, version: str, total_batch_size: int, max_train_steps: int,
                      num_epochs: int, optimizer_name: str, started_at: float) -> dict:
    """sd-scripts' metadata dict for this run (its names, its value formats)."""
    first = cfg.datasets[0]
    meta = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": _s(started_at),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": _s(cfg.learning_rate),
        "ss_text_encoder_lr": _s(cfg.text_encoder_lr),
        "ss_unet_lr": _s(cfg.unet_lr),
        "ss_num_train_images": _s(data.num_train_images),
        "ss_num_reg_images": _s(data.num_reg_images),
        "ss_num_batches_per_epoch": _s(data.batches_per_epoch),
        "ss_num_epochs": _s(num_epochs),
        "ss_gradient_checkpointing": _s(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(cfg.gradient_accumulation_steps),
        "ss_max_train_steps": _s(max_train_steps),
        "ss_lr_warmup_steps": _s(cfg.lr_warmup_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": "False",
        "ss_v2": _s(version == "sd2"),
        "ss_base_model_version": {"sd2": "sd_v2"}.get(version, "sd_v1"),
        "ss_clip_skip": _s(cfg.clip_skip),
        "ss_max_token_length": _s(cfg.max_token_length),
        "ss_cache_latents": _s(cfg.cache_latents or cfg.cache_latents_to_disk),
        "ss_seed": _s(cfg.seed),
        "ss_lowram": "False",
        "ss_noise_offset": _s(cfg.noise_offset),
        "ss_min_snr_gamma": _s(cfg.min_snr_gamma),
        "ss_training_comment": _s(cfg.training_comment),
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": _s(cfg.max_grad_norm),
        "ss_prior_loss_weight": _s(cfg.prior_loss_weight),
        "ss_min_timestep": _s(cfg.min_timestep),
        "ss_max_timestep": _s(cfg.max_timestep),
        "ss_batch_size_per_device": _s(first.batch_size),
        "ss_total_batch_size": _s(total_batch_size),
        "ss_resolution": _s(tuple(first.resolution)),
        "ss_enable_bucket": _s(first.enable_bucket),
        "ss_min_bucket_reso": _s(first.min_bucket_reso),
        "ss_max_bucket_reso": _s(first.max_bucket_reso),
        "ss_bucket_no_upscale": _s(first.bucket_no_upscale),
        "ss_keep_tokens": _s(first.subsets[0].keep_tokens),
        "ss_caption_dropout_rate": _s(first.subsets[0].caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(first.subsets[0].caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _s(first.subsets[0].caption_tag_dropout_rate),
        "ss_flip_aug": _s(first.subsets[0].flip_aug),
        "ss_color_aug": _s(first.subsets[0].color_aug),
        "ss_shuffle_caption": _s(first.subsets[0].shuffle_caption),
        "ss_dataset_dirs": json.dumps(_dirs(data, reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(data, reg=True)),
        "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_bucket_info": json.dumps(data.bucket_info()),
        "ss_sd_model_name": Path(str(cfg.pretrained_model_name_or_path)).name,
        "ss_new_sd_model_hash": "None",
        "ss_vae_name": "None",
    }
    meta["modelspec.resolution"] = "{}x{}".format(*first.resolution)
    if cfg.network_args:  # as given, like sd-scripts: {"conv_dim": "4", "conv_alpha": "1"}
        meta["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in cfg.network_args))
    if cfg.training_comment:
        meta["modelspec.description"] = cfg.training_comment
    return meta


def _dirs(data, reg: bool) -> dict:
    """ss_dataset_dirs / ss_reg_dataset_dirs: {folder name: {n_repeats, img_count}}."""
    info = data.dataset_dirs_info()
    reg_names = {s.name for ds in data.configs for s in ds.subsets if s.is_reg}
    return {name: v for name, v in info.items() if (name in reg_names) == reg}


def at_save(meta: dict, *, steps: int, epoch: int) -> dict:
    return {**meta, "ss_steps": str(steps), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
