"""The `ss_*` training metadata sd-scripts writes into a LoRA file (all values strings).

`training_metadata` is computed once at the start of a run; `at_save` adds
what changes at each save (steps, epoch, finish time). The network keys
(`ss_network_dim`, ...), the model version (`ss_v2`, `ss_base_model_version`),
`modelspec.*` but the training resolution, and the `sshs_*` hashes are filled
in by the kohya writer (lora_sd.formats.kohya_metadata), their one home.
"""

import json
import time
import uuid
from pathlib import Path

from lora_sd.config.kv_args import LYCORIS, parse_network_args
from lora_sd.training.loss import objective_metadata


def training_metadata(cfg, data, *, total_batch_size: int, max_train_steps: int,
                      num_epochs: int, optimizer_name: str, started_at: float) -> dict:
    """sd-scripts' metadata dict for this run (its names, its value formats)."""
    first = cfg.datasets[0]
    meta = {
        "ss_session_id": uuid.uuid4().int % 2**31,
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": data.num_train_images,
        "ss_num_reg_images": data.num_reg_images,
        "ss_num_batches_per_epoch": data.batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": cfg.full_fp16,  # sd-scripts' train_network writes no ss_full_bf16
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents or cfg.cache_latents_to_disk,
        "ss_seed": cfg.seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_training_comment": cfg.training_comment,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_timestep": cfg.min_timestep,
        "ss_max_timestep": cfg.max_timestep,
        "ss_batch_size_per_device": first.batch_size,
        "ss_total_batch_size": total_batch_size,
        "ss_resolution": tuple(first.resolution),
        "ss_enable_bucket": first.enable_bucket,
        "ss_min_bucket_reso": first.min_bucket_reso,
        "ss_max_bucket_reso": first.max_bucket_reso,
        "ss_bucket_no_upscale": first.bucket_no_upscale,
        "ss_keep_tokens": first.subsets[0].keep_tokens,
        "ss_caption_dropout_rate": first.subsets[0].caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": first.subsets[0].caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": first.subsets[0].caption_tag_dropout_rate,
        "ss_flip_aug": first.subsets[0].flip_aug,
        "ss_color_aug": first.subsets[0].color_aug,
        "ss_shuffle_caption": first.subsets[0].shuffle_caption,
        "ss_dataset_dirs": json.dumps(_dirs(data, reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(data, reg=True)),
        "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_bucket_info": json.dumps(data.bucket_info()),
        "ss_sd_model_name": Path(str(cfg.pretrained_model_name_or_path)).name,
        "ss_new_sd_model_hash": "None",
        "ss_vae_name": "None",
    }
    meta.update(network_metadata(cfg))
    meta.update(objective_metadata(cfg))
    if cfg.training_comment:
        meta["modelspec.description"] = cfg.training_comment
    meta["modelspec.resolution"] = "{}x{}".format(*first.resolution)
    return {k: str(v) for k, v in meta.items()}  # None -> "None", as sd-scripts writes it


def network_metadata(cfg) -> dict:
    """`ss_network_args` as given, like sd-scripts ({"conv_dim": "4", "conv_alpha": "1"}); a LyCORIS network
    also names its module and its rank/alpha, as sd-scripts does for every network (the kohya writer fills
    them in from the tensors otherwise), and a DoRA says which axis its magnitude is on (ours: per output
    row)."""
    args = {k.strip(): v.strip() for k, _, v in (a.partition("=") for a in cfg.network_args)}
    meta = {}
    if cfg.network_module == LYCORIS:
        alpha = cfg.network_alpha or cfg.network_dim  # alpha 0: alpha = rank, as the modules have it
        meta.update(ss_network_module=LYCORIS, ss_network_dim=cfg.network_dim, ss_network_alpha=f"{alpha:g}")
        if parse_network_args(cfg.network_args, LYCORIS).get("dora_wd"):
            args.setdefault("wd_on_output", "True")
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def _dirs(data, reg: bool) -> dict:
    """ss_dataset_dirs / ss_reg_dataset_dirs: {folder name: {n_repeats, img_count}}."""
    info = data.dataset_dirs_info()
    reg_names = {s.name for ds in data.configs for s in ds.subsets if s.is_reg}
    return {name: v for name, v in info.items() if (name in reg_names) == reg}


def at_save(meta: dict, *, steps: int, epoch: int) -> dict:
    return {**meta, "ss_steps": str(steps), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
