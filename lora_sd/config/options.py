"""TrainConfig: every training option under its kohya name, with sd-scripts' default and a one-line help.

This module is only the schema; lora_sd.config.load reads TOML and command
lines into it, lora_sd.config.validate checks the values, lora_sd.config.flags
makes the command-line flags from the same fields.
"""

import dataclasses
import typing
from dataclasses import dataclass, field


def opt(default, help):
    """A config field with its one-line help (shown by --help; every option has one)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- base model
    pretrained_model_name_or_path: str | None = opt(None, "base model: diffusers folder, .safetensors/.ckpt file "
                                                    "or hub id (required)")
    v2: bool = opt(False, "the base model is Stable Diffusion 2.x")
    v_parameterization: bool = opt(False, "v-prediction targets (SD 2.x 768-v models)")
    model_config: str | None = opt(None, "configs folder (unet/, vae/, text_encoder/, tokenizer/) for a single file "
                                   "of another architecture than SD 1.5 / 2.1 (lora-sd's own option)")
    # --- data
    dataset_config: str | None = opt(None, "dataset TOML ([general] / [[datasets]] / [[datasets.subsets]])")
    train_data_dir: str | None = opt(None, "DreamBooth folders `N_tokens/` (when no dataset config)")
    reg_data_dir: str | None = opt(None, "regularization folders `N_tokens/`")
    resolution: tuple[int, int] | None = opt(None, "`W,H` or `S`; the datasets' default resolution (512)")
    train_batch_size: int = opt(1, "batch size per device (the datasets' default batch_size)")
    enable_bucket: bool = opt(False, "aspect-ratio buckets: each image trains at a size near its own aspect")
    min_bucket_reso: int = opt(256, "smallest bucket side in pixels")
    max_bucket_reso: int = opt(1024, "largest bucket side in pixels")
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this (a multiple of 8)")
    bucket_no_upscale: bool = opt(False, "buckets never enlarge an image: small images keep their size")
    caption_extension: str = opt(".caption", "caption file extension beside each image (e.g. .txt)")
    shuffle_caption: bool = opt(False, "shuffle the comma-separated tags of each caption every step")
    keep_tokens: int = opt(0, "keep the first N tags in place when shuffling or dropping tags")
    flip_aug: bool = opt(False, "random horizontal flips (for symmetric subjects)")
    color_aug: bool = opt(False, "random hue shifts (needs cache_latents off)")
    random_crop: bool = opt(False, "random crop instead of center crop (needs cache_latents off)")
    caption_dropout_rate: float = opt(0.0, "probability (0..1) that an image trains with an empty caption")
    caption_dropout_every_n_epochs: int = opt(0, "drop all captions every N-th epoch (0: never)")
    caption_tag_dropout_rate: float = opt(0.0, "probability (0..1) of dropping each tag (after keep_tokens)")
    caption_prefix: str | None = opt(None, "text prepended to every caption")
    caption_suffix: str | None = opt(None, "text appended to every caption")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images")
    cache_latents: bool = opt(False, "encode images with the VAE once, in memory")
    cache_latents_to_disk: bool = opt(False, "cache latents on disk too")
    vae_batch_size: int = opt(1, "images per VAE call when caching latents")
    max_data_loader_n_workers: int | None = opt(None, "DataLoader workers (default min(8, cpus-1))")
    persistent_data_loader_workers: bool = opt(False, "keep DataLoader workers alive between epochs")
    max_token_length: int | None = opt(None, "75 (default), 150 or 225 caption tokens")
    clip_skip: int | None = opt(None, "use the text encoder's n-th last layer (2 for anime models; SDXL ignores it)")
    cache_text_encoder_outputs: bool = opt(False, "encode each caption once with the (frozen) text encoders, then "
                                           "free them from the device (needs network_train_unet_only)")
    cache_text_encoder_outputs_to_disk: bool = opt(False, "cache the text-encoder outputs on disk too")
    # --- network
    network_module: str = opt("networks.lora", "networks.lora (or lora): the kohya LoRA network; lycoris.kohya: "
                              "LoCon, LoHa, LoKr, DoRA through network_args algo=...")
    network_dim: int = opt(4, "LoRA rank")
    network_alpha: float = opt(1.0, "scale is alpha / rank (0: alpha = rank, as sd-scripts; not negative)")
    network_args: list[str] = opt([], "key=value: conv_dim (rank of 3x3 conv LoRA), conv_alpha, rank_dropout, "
                                "module_dropout, loraplus_*lr_ratio, down/mid/up_lr_weight, block_lr_zero_threshold, "
                                "block_dims, block_alphas, conv_block_dims, conv_block_alphas; lycoris.kohya adds "
                                "algo=lora|locon|loha|lokr, factor, decompose_both, use_tucker, dora_wd, preset")
    network_weights: str | None = opt(None, "a LoRA file/folder to continue training from")
    network_multiplier: float = opt(1.0, "strength of the LoRA while training (a dataset's own multiplies it)")
    dim_from_weights: bool = opt(False, "take ranks and alphas from network_weights")
    network_train_unet_only: bool = opt(False, "train only the U-Net's LoRA")
    network_train_text_encoder_only: bool = opt(False, "train only the text encoder's LoRA")
    # --- optimization
    learning_rate: float = opt(1e-4, "learning rate of every LoRA weight (unless unet_lr/text_encoder_lr)")
    unet_lr: float | None = opt(None, "U-Net LoRA learning rate (default learning_rate)")
    text_encoder_lr: float | list[float] | None = opt(None, "text encoder LoRA learning rate (default "
                                                      "learning_rate); SDXL: one value, or two (te1, te2)")
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov, Adafactor, Prodigy, DAdaptAdam")
    optimizer_args: list[str] = opt([], "key=value, e.g. weight_decay=0.01 betas=0.9,0.99")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    lr_warmup_steps: int = opt(0, "steps of linear warmup (with a *_with_warmup, linear, cosine... schedule)")
    lr_scheduler_num_cycles: int = opt(1, "cycles of cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power of polynomial")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: none)")
    max_train_steps: int = opt(1600, "optimizer steps to train")
    max_train_epochs: int | None = opt(None, "epochs to train (overrides max_train_steps)")
    gradient_accumulation_steps: int = opt(1, "micro-batches summed per optimizer step")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, slower")
    mixed_precision: str = opt("no", "no, fp16 (GPU only) or bf16; LoRA weights stay float32 (but full_bf16/fp16)")
    fp8_base: bool = opt(False, "store the frozen base model's Linear/Conv weights in float8 (computed in "
                         "mixed_precision, which must be bf16 or fp16): about half the memory of bf16")
    xformers: bool = opt(False, "xformers attention (PyTorch SDPA is the default)")
    sdpa: bool = opt(False, "PyTorch SDPA attention (the default anyway)")
    seed: int | None = opt(None, "random seed (random when not given; recorded in the outputs)")
    noise_offset: float | None = opt(None, "add this much per-channel offset noise (~0.1: darker darks, "
                                     "brighter brights; >= 0)")
    min_snr_gamma: float | None = opt(None, "Min-SNR loss weighting: min(SNR, gamma) / SNR (5 is usual; > 0)")
    min_timestep: int = opt(0, "smallest diffusion timestep sampled (0..999)")
    max_timestep: int = opt(1000, "largest diffusion timestep sampled, exclusive (1..1000)")
    # --- outputs
    output_dir: str = opt("output", "folder for the LoRA, states, samples and the resolved config")
    output_name: str = opt("last", "file name of the LoRA without extension (no path: it stays in output_dir)")
    save_model_as: str = opt("safetensors", "safetensors or ckpt (kohya), diffusers, peft")
    save_precision: str | None = opt(None, "float (default), fp16, bf16")
    save_every_n_epochs: int | None = opt(None, "also save the LoRA every N epochs")
    save_every_n_steps: int | None = opt(None, "also save the LoRA every N steps")
    save_state: bool = opt(False, "also save the training state (for resume) at each save")
    save_state_on_train_end: bool = opt(False, "save the training state at the end of training (only)")
    resume: str | None = opt(None, "a state folder written by save_state")
    training_comment: str | None = opt(None, "text stored in the LoRA's metadata (ss_training_comment)")
    logging_dir: str | None = opt(None, "TensorBoard logs")
    log_prefix: str | None = opt(None, "prefix of the run's folder under logging_dir")
    sample_prompts: str | None = opt(None, "prompt file: one per line, options --n --w --h --d --l --s")
    sample_every_n_steps: int | None = opt(None, "sample images from sample_prompts every N steps")
    sample_every_n_epochs: int | None = opt(None, "sample images from sample_prompts every N epochs")
    sample_sampler: str = opt("ddim", "ddim, euler, euler_a, dpmsolver++, pndm, lms, ... (as generate's --sampler)")
    # --- issue 12: objective ---
    loss_type: str = opt("l2", "l2, l1, huber or smooth_l1 (sd-scripts' conditional_loss; huber: 2c(sqrt(d^2+c^2)-c))")
    huber_schedule: str = opt("snr", "threshold c over the timesteps of huber/smooth_l1: constant, exponential or snr")
    huber_c: float = opt(0.1, "Huber threshold (constant: c; exponential: c at t=T; snr: c at infinite noise; > 0)")
    huber_scale: float = opt(1.0, "Huber threshold scale of the constant and exponential schedules (> 0)")
    noise_offset_random_strength: bool = opt(False, "each step's noise offset is uniform in [0, noise_offset]")
    multires_noise_iterations: int | None = opt(None, "multi-resolution (pyramid) noise with this many levels "
                                                "(6-10 usual; 0: off)")
    multires_noise_discount: float = opt(0.3, "weight ratio of each coarser multires noise level (0..1)")
    ip_noise_gamma: float | None = opt(None, "input perturbation: the U-Net input gets gamma x extra noise, the "
                                       "target not (~0.1; >= 0)")
    ip_noise_gamma_random_strength: bool = opt(False, "each step's ip_noise_gamma is uniform in [0, ip_noise_gamma]")
    debiased_estimation_loss: bool = opt(False, "weigh each loss by 1/sqrt(SNR) (1/(SNR+1) with v-prediction)")
    masked_loss: bool = opt(False, "loss only where the masks of `conditioning_data_dir` subsets are white")
    alpha_mask: bool = opt(False, "the images' alpha channel masks the loss (the datasets' default)")
    weighted_captions: bool = opt(False, "(word:1.2) / (word) / [word] in captions scale those tokens' text-encoder "
                                  "output; no commas inside the brackets with shuffle_caption or tag dropout")
    # --- issue 12: optim ---
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the up matrices (lora_B) learn at this times the learning "
                                          "rate (16 in the paper, 4 a common start; LoRA/DoRA only)")
    loraplus_unet_lr_ratio: float | None = opt(None, "LoRA+ ratio of the U-Net (default loraplus_lr_ratio)")
    loraplus_text_encoder_lr_ratio: float | None = opt(None, "LoRA+ ratio of the text encoder(s) (default "
                                                       "loraplus_lr_ratio)")
    network_dropout: float | None = opt(None, "dropout probability [0, 1) on the LoRA's input while training "
                                        "(PEFT's lora_dropout; LoRA/DoRA only)")
    scale_weight_norms: float | None = opt(None, "max-norm regularisation: after each step, scale down every module "
                                           "whose delta's Frobenius norm is above this (1.0 is usual; not DoRA)")
    # --- issue 12: validation, saving, EMA ---
    validation_split: float = opt(0.0, "fraction in [0, 1) of each training subset's images held out for the "
                                  "validation loss (chosen with validation_seed; never regularization images)")
    validation_seed: int | None = opt(None, "seed of the validation split and of the validation noise (default: seed)")
    validate_every_n_steps: int | None = opt(None, "validation loss every N steps (as well as every epoch)")
    validate_every_n_epochs: int | None = opt(None, "validation loss every N epochs (default: every epoch)")
    max_validation_steps: int | None = opt(None, "at most N validation batches per process at each validation "
                                           "(default: all)")
    save_last_n_epochs: int | None = opt(None, "keep only the last N every-n-epochs saves (older ones removed; the "
                                         "final save is always kept)")
    save_last_n_epochs_state: int | None = opt(None, "the same for the epoch state folders (default: "
                                               "save_last_n_epochs)")
    save_last_n_steps: int | None = opt(None, "keep only the every-n-steps saves of the last N steps (older ones "
                                        "removed; the final save is always kept)")
    save_last_n_steps_state: int | None = opt(None, "the same for the step state folders (default: "
                                              "save_last_n_steps)")
    ema_decay: float | None = opt(None, "keep an exponential moving average of the LoRA weights with this decay "
                                  "(e.g. 0.999; off when not given), saved as <name>-ema beside each save")
    ema_warmup: bool = opt(True, "EMA decay at optimizer step k is min(ema_decay, k / (9 + k)) (the first step "
                           "copies the weights); false: ema_decay from the first step")
    ema_for_samples: bool = opt(False, "sample images with the EMA weights (needs ema_decay)")
    ema_for_validation: bool = opt(False, "compute the validation loss with the EMA weights (needs ema_decay)")
    # --- issue 13: precision ---
    full_bf16: bool = opt(False, "LoRA weights, gradients and optimizer state in bfloat16 (needs mixed_precision "
                          "bf16): less memory; an update below ~1/256 of a weight is lost")
    full_fp16: bool = opt(False, "LoRA weights, gradients and optimizer state in float16 (needs mixed_precision fp16, "
                          "a GPU; not with Prodigy/DAdaptAdam or a non-fused AdamW)")
    allow_tf32: bool = opt(False, "float32 matmuls and convolutions on TF32 tensor cores (CUDA, Ampere and later); "
                           "off: torch's defaults, as sd-scripts")
    # --- issue 13: compile and fused backward ---
    torch_compile: bool = opt(False, "compile the trained U-Net (and trained text encoders) with torch.compile "
                              "through `dynamo_backend`; the first steps compile")
    dynamo_backend: str = opt("inductor", "torch.compile backend of torch_compile: inductor (fast; a C++ compiler on "
                              "CPU, triton on CUDA), aot_eager or eager (checks, no speed-up), cudagraphs (CUDA), ...")
    fused_backward_pass: bool = opt(False, "step the optimizer on each LoRA weight inside backward as soon as its "
                                    "gradient is ready, then free it (less memory; AdamW, SGDNesterov, Lion, "
                                    "Adafactor...; gradient_accumulation_steps 1, one process)")
    # --- issue 13: data path ---
    channels_last: bool = opt(False, "the U-Net and its input latents in channels_last (NHWC) memory format: faster "
                              "convolutions on CUDA GPUs in fp16/bf16, the same results (lora-sd's own option)")
    # --- resolved by load_config, not options
    datasets: list = field(default_factory=list, metadata={"internal": True})
    source: str = field(default="", metadata={"internal": True})

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
OPTION_NAMES = tuple(FIELDS)
TYPES = {name: typ for name, typ in typing.get_type_hints(TrainConfig).items() if name in FIELDS}

# sd-scripts options we read but do not implement: (type, the values accepted because they change nothing).
SD_SCRIPTS_ACCEPTED = {
    "mem_eff_attn": (bool, (False,)), "lowram": (bool, (False,)),
    "no_half_vae": (bool, (False, True)),  # the VAE always stays float32 here (as no_half_vae = true)
    "log_with": (str | None, (None, "tensorboard")),  # tensorboard needs logging_dir (checked), as sd-scripts
    "save_n_epoch_ratio": (int | None, (None,)), "use_8bit_adam": (bool, (False,)),
    "use_lion_optimizer": (bool, (False,)), "huggingface_repo_id": (str | None, (None,)),
    "tokenizer_cache_dir": (str | None, (None,)), "vae": (str | None, (None,)),
    "console_log_level": (str | None, (None,)), "sample_at_first": (bool, (False,)),
    "zero_terminal_snr": (bool, (False,)), "face_crop_aug_range": (str | None, (None,)),
    "wandb_api_key": (str | None, (None,)), "max_bucket_reso_steps": (int | None, (None,)),
}
