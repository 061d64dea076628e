"""Value checks of a TrainConfig, after its types are right: each problem added to one ConfigErrors.

Only tables of this package are consulted (choices, kv_args): checking a
config loads neither torch nor diffusers, and writes nothing.
"""

import difflib
import os
from pathlib import Path

from lora_sd import demo
from lora_sd.config.choices import CHOICES, OPTIMIZERS, optimizer_named
from lora_sd.config.kv_args import parse_network_args, parse_optimizer_args
from lora_sd.config.options import TrainConfig
from lora_sd.errors import ConfigError, ConfigErrors

AT_LEAST_1 = ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size",
              "lr_scheduler_num_cycles")
AT_LEAST_1_WHEN_GIVEN = ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps",
                         "sample_every_n_epochs", "clip_skip")
NOT_NEGATIVE = ("learning_rate", "unet_lr", "text_encoder_lr", "lr_warmup_steps", "max_grad_norm",
                "prior_loss_weight", "network_alpha", "noise_offset", "keep_tokens", "caption_dropout_every_n_epochs",
                "max_data_loader_n_workers")
PROBABILITIES = ("caption_dropout_rate", "caption_tag_dropout_rate")


def check_values(cfg: TrainConfig, errors: ConfigErrors, inline_datasets: bool):
    _check_choices(cfg, errors)
    _check_ranges(cfg, errors)
    _check_output_name(cfg, errors)
    _check_objective(cfg, errors)
    _check_validation_saving_ema(cfg, errors)
    _check_precision(cfg, errors)
    _check_compile(cfg, errors)

    def network(items):
        _check_network(cfg, parse_network_args(items, cfg.network_module))

    for key, parse in (("network_args", network), ("optimizer_args", parse_optimizer_args)):
        try:
            parse(getattr(cfg, key))
        except ConfigError as e:
            errors.add(key, str(e).removeprefix(f"`{key}`: "))
    _check_demo_paths(cfg, errors)
    _check_optim(cfg, errors)
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        errors.add("network_train_unet_only", "and `network_train_text_encoder_only` are both set: nothing "
                   "would be trained (set one, or neither to train both)")
    if not cfg.pretrained_model_name_or_path:
        errors.add("pretrained_model_name_or_path", "is required (a diffusers folder or a .safetensors/.ckpt file)")
    sources = [k for k in ("dataset_config", "train_data_dir") if getattr(cfg, k)] + (["[[datasets]]"] if inline_datasets else [])
    if not sources:
        errors.add("dataset_config", "is required: give a dataset TOML, inline [[datasets]] tables or `train_data_dir`")
    elif len(sources) > 1:
        errors.add(sources[0], f"and `{sources[1]}` are both given: use one dataset source")
    if cfg.fp8_base and cfg.mixed_precision == "no":
        errors.add("fp8_base", 'stores the base model in float8 and computes in the mixed-precision dtype: set '
                   '`mixed_precision = "bf16"` (or "fp16" on a GPU)')
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        if cfg.train_text_encoder:
            errors.add("cache_text_encoder_outputs", "needs `network_train_unet_only = true`: text encoders that are "
                       "trained cannot have their outputs cached (as in sd-scripts)")
    if cfg.dim_from_weights and not cfg.network_weights:
        errors.add("dim_from_weights", "needs `network_weights`")


def _check_network(cfg, args: dict):
    """Network args that do not fit the rest of the config."""
    kind = "DoRA" if args.get("dora_wd") else {"loha": "LoHa", "lokr": "LoKr"}.get(args.get("algo"))
    if kind and cfg.save_model_as == "diffusers":
        raise ConfigError(f"a {kind} network cannot be saved with `save_model_as = \"diffusers\"` (diffusers' LoRA "
                          "format holds plain LoRA only): use safetensors (kohya/LyCORIS names) or peft")
    if args.get("dora_wd") and cfg.fp8_base:
        raise ConfigError("dora_wd=true does not train on `fp8_base`: PEFT's DoRA takes the norm of the base weights, "
                          "which it cannot do in float8; remove fp8_base (bf16 mixed precision still halves memory)")
    if args.get("dora_wd") and cfg.network_multiplier != 1:
        raise ConfigError("dora_wd=true trains at `network_multiplier` 1 only: PEFT's DoRA does not scale its "
                          "magnitude with a strength as LyCORIS does")


LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def _check_optim(cfg, errors):
    """Issue 12's optimisation options: ranges, and the adapter kinds they do not apply to."""
    if cfg.network_dropout is not None and not 0 <= cfg.network_dropout < 1:
        errors.add("network_dropout", f"must be in [0, 1) (a probability), got {cfg.network_dropout}")
    if cfg.scale_weight_norms is not None and cfg.scale_weight_norms <= 0:
        errors.add("scale_weight_norms", f"must be > 0 (the largest norm a module's delta may have; 1.0 is usual), "
                   f"got {cfg.scale_weight_norms}")
    for key in LORAPLUS:
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            errors.add(key, f"must be > 0 (the up matrices' learning rate over the down ones'), got {getattr(cfg, key)}")
    try:
        args = parse_network_args(cfg.network_args, cfg.network_module)
    except ConfigError:
        return  # reported with the network_args
    kind = "DoRA" if args.get("dora_wd") else {"loha": "LoHa", "lokr": "LoKr"}.get(args.get("algo"))
    for key in LORAPLUS:
        if key in args and getattr(cfg, key) is not None and args[key] != getattr(cfg, key):
            errors.add(key, f"is {getattr(cfg, key)}, but `network_args` says {key}={args[key]}: give it once")
    if kind in ("LoHa", "LoKr") and any(getattr(cfg, k) or args.get(k) for k in LORAPLUS):
        key = next(k for k in LORAPLUS if getattr(cfg, k) or args.get(k))
        errors.add(key, f"(LoRA+) scales the learning rate of LoRA's up matrices; a {kind} has none (LyCORIS does not "
                   "apply it either): use algo=lora/locon, or remove it")
    if kind in ("LoHa", "LoKr") and cfg.network_dropout:
        errors.add("network_dropout", f"applies to LoRA/DoRA layers (PEFT's lora_dropout); a {kind} has none: use "
                   "rank_dropout / module_dropout in `network_args`, or remove it")
    if kind == "DoRA" and cfg.scale_weight_norms:
        errors.add("scale_weight_norms", "does not apply to DoRA: its delta is set by the magnitude vector too, so "
                   "scaling the up/down matrices bounds no norm; remove it, or train algo=lora")
    if cfg.network_weights and not cfg.dim_from_weights and (args.get("block_dims") or args.get("conv_block_dims")):
        errors.add("network_args", "block_dims / conv_block_dims with `network_weights`: the file's ranks decide; "
                   "set `dim_from_weights = true`, or remove them")


def _check_choices(cfg, errors):
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            errors.add(key, f"must be one of {', '.join(str(a) for a in allowed if a is not None)}; got {value!r}")
    if optimizer_named(cfg.optimizer_type) is None:
        lower = {o.lower(): o for o in OPTIMIZERS}
        close = [lower[c] for c in difflib.get_close_matches(cfg.optimizer_type.lower(), list(lower), n=1, cutoff=0.4)]
        errors.add("optimizer_type", f"must be one of {', '.join(OPTIMIZERS)}; got {cfg.optimizer_type!r}"
                   + (f" (did you mean `{close[0]}`?)" if close else ""))


def _check_ranges(cfg, errors):
    """Values that make no sense (floats are already finite: lora_sd.config.coerce)."""
    for key in AT_LEAST_1:
        if getattr(cfg, key) < 1:
            errors.add(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in AT_LEAST_1_WHEN_GIVEN:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            errors.add(key, f"must be >= 1 when given, got {getattr(cfg, key)}")
    for key in NOT_NEGATIVE:
        value = getattr(cfg, key)
        if value is not None and min(value if isinstance(value, list) else [value]) < 0:
            errors.add(key, f"must be >= 0, got {value}")
    for key in PROBABILITIES:
        if not 0 <= getattr(cfg, key) <= 1:
            errors.add(key, f"must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.seed is not None and not 0 <= cfg.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy)
        errors.add("seed", f"must be in [0, {2**32 - 1}], got {cfg.seed}")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:  # gamma 0 weighs every loss 0
        errors.add("min_snr_gamma", f"must be > 0 when given (5 is usual), got {cfg.min_snr_gamma}")
    if not 0 <= cfg.min_timestep < cfg.max_timestep <= 1000:
        errors.add("min_timestep", f"and `max_timestep` must satisfy 0 <= min < max <= 1000, got "
                   f"{cfg.min_timestep}, {cfg.max_timestep}")


def _check_objective(cfg, errors):
    """Loss and noise options (issue 12): ranges, and the random strengths that need their option."""
    for key in ("huber_c", "huber_scale"):
        if getattr(cfg, key) <= 0:
            errors.add(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.multires_noise_iterations is not None and cfg.multires_noise_iterations < 0:  # 0: off, as sd-scripts
        errors.add("multires_noise_iterations", f"must be >= 0 (0: off; 6-10 is usual), got "
                   f"{cfg.multires_noise_iterations}")
    if not 0 <= cfg.multires_noise_discount <= 1:
        errors.add("multires_noise_discount", f"must be in [0, 1], got {cfg.multires_noise_discount}")
    if cfg.ip_noise_gamma is not None and cfg.ip_noise_gamma < 0:
        errors.add("ip_noise_gamma", f"must be >= 0 when given (~0.1 is usual), got {cfg.ip_noise_gamma}")
    for flag, base in (("noise_offset_random_strength", "noise_offset"), ("ip_noise_gamma_random_strength",
                                                                          "ip_noise_gamma")):
        if getattr(cfg, flag) and not getattr(cfg, base):
            errors.add(flag, f"draws a strength in [0, `{base}`]: set `{base}` too (or remove {flag})")


def _check_output_name(cfg, errors):
    """output_name is a file name inside output_dir (log_prefix one inside logging_dir): no path, nothing that
    resolves elsewhere."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    for key, folder_key, empty_ok in (("output_name", "output_dir", False), ("log_prefix", "logging_dir", True)):
        name = getattr(cfg, key)
        if name is None or (empty_ok and name == ""):
            continue
        if name in ("", ".", "..") or any(s in name for s in separators) or "\0" in name or Path(name).is_absolute():
            errors.add(key, f"must be a plain file name without a path (it is written in `{folder_key}`); "
                       f"got {name!r}")
        elif key == "output_name":
            folder = Path(cfg.output_dir).resolve()
            if Path(folder, name).resolve().parent != folder:  # e.g. a link in output_dir that points elsewhere
                errors.add(key, f"{name!r} resolves outside `output_dir` {cfg.output_dir}")


def _check_demo_paths(cfg, errors):
    for key in ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir"):
        value = getattr(cfg, key)
        if demo.is_demo_path(value) and value not in demo.ASSETS:
            errors.add(key, f"{value!r} is not a demo asset; known: {', '.join(demo.ASSETS)}")
    for key in ("train_data_dir", "reg_data_dir"):
        if demo.is_demo_path(getattr(cfg, key)) and not demo.is_demo_path(cfg.pretrained_model_name_or_path):
            # the demo's assets are made together when training loads the demo model (lora_sd.demo)
            errors.add(key, f"{getattr(cfg, key)!r} goes with `pretrained_model_name_or_path = "
                       f"\"{demo.MODEL}\"` (the demo's assets are made together when its training starts)")


def _check_validation_saving_ema(cfg, errors):
    """Issue 12's validation, save_last_n_* and EMA options: ranges, and the options they need."""
    if not 0 <= cfg.validation_split < 1:
        errors.add("validation_split", f"must be in [0, 1) (the fraction of images held out), got "
                   f"{cfg.validation_split}")
    if cfg.validation_seed is not None and not 0 <= cfg.validation_seed < 2**32:
        errors.add("validation_seed", f"must be in [0, {2**32 - 1}], got {cfg.validation_seed}")
    counts = ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "save_last_n_epochs",
              "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state")
    for key in counts:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            errors.add(key, f"must be >= 1 when given, got {getattr(cfg, key)}")
    for key, needs in (("save_last_n_epochs", "save_every_n_epochs"),
                       ("save_last_n_epochs_state", "save_every_n_epochs"),
                       ("save_last_n_steps", "save_every_n_steps"), ("save_last_n_steps_state", "save_every_n_steps")):
        if getattr(cfg, key) is not None and not getattr(cfg, needs):
            errors.add(key, f"needs `{needs}` (it keeps only the last of those saves)")
    for key in ("save_last_n_epochs_state", "save_last_n_steps_state"):
        if getattr(cfg, key) is not None and not cfg.save_state:
            errors.add(key, "needs `save_state` (it keeps only the last of the state folders)")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        errors.add("ema_decay", f"must be in (0, 1) (e.g. 0.999), got {cfg.ema_decay}")
    for key in ("ema_for_samples", "ema_for_validation"):
        if getattr(cfg, key) and cfg.ema_decay is None:
            errors.add(key, "needs `ema_decay` (no EMA of the weights is kept without it)")


def _check_precision(cfg, errors):
    """full_bf16 / full_fp16 (issue 13): sd-scripts' mixed-precision requirement, not both, and the optimizers
    that cannot step float16 weights: a non-fused AdamW and Prodigy add their epsilon (1e-8) in float16, where it
    is 0, so a weight with a zero gradient (every LoRA down matrix at the first step) becomes NaN; DAdaptAdam's
    step size never grows from float16 sums. Fused AdamW (the default on CUDA) computes in float32."""
    if cfg.full_bf16 and cfg.full_fp16:
        errors.add("full_bf16", "and `full_fp16` are both set: the LoRA trains in one dtype; set one")
        return
    for key, precision in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if getattr(cfg, key) and cfg.mixed_precision != precision:
            errors.add(key, f"needs `mixed_precision = \"{precision}\"` (as in sd-scripts); got "
                       f"{cfg.mixed_precision!r}")
    if not cfg.full_fp16:
        return
    name = optimizer_named(cfg.optimizer_type)
    try:
        args = parse_optimizer_args(cfg.optimizer_args)
    except ConfigError:
        return  # reported with the optimizer_args
    if name in ("Prodigy", "DAdaptAdam") or (name == "AdamW" and not args.get("fused", "foreach" not in args)):
        what = "fused=False / foreach in `optimizer_args`" if name == "AdamW" else f"`optimizer_type = \"{name}\"`"
        errors.add("full_fp16", f"cannot train with {what}: it steps float16 weights in float16 (NaN or no "
                   "progress); use AdamW (fused, the default on CUDA), AdamW8bit, Lion, Adafactor or SGDNesterov, "
                   "or full_bf16")


# sd-scripts' --dynamo_backend choices (library/train_util.py); lora_sd.training.compile checks that the one
# chosen runs here
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt")
# optimizers whose update of a weight reads only that weight and its gradient (fused_backward_pass steps them
# one weight at a time); Prodigy and D-Adaptation estimate their step size from all weights together
PER_WEIGHT_OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Adafactor")


def _check_compile(cfg, errors):
    """Issue 13's torch_compile / dynamo_backend and fused_backward_pass: names, and what they cannot run with."""
    if cfg.dynamo_backend not in DYNAMO_BACKENDS:
        close = difflib.get_close_matches(cfg.dynamo_backend, DYNAMO_BACKENDS, n=1)
        errors.add("dynamo_backend", f"must be one of {', '.join(DYNAMO_BACKENDS)}; got {cfg.dynamo_backend!r}"
                   + (f" (did you mean `{close[0]}`?)" if close else ""))
    if cfg.torch_compile:
        if cfg.xformers:
            errors.add("torch_compile", "with `xformers`: compile captures PyTorch SDPA attention (the default), "
                       "xformers' kernels break its graph; remove `xformers`")
        try:
            module_dropout = parse_network_args(cfg.network_args, cfg.network_module).get("module_dropout")
        except ConfigError:
            module_dropout = None  # reported with the network_args
        if module_dropout:
            errors.add("torch_compile", "with module_dropout (`network_args`): it switches layers' LoRA on and off "
                       "by a random draw inside the forward, which breaks the compiled graph at every layer (LoRA: "
                       "a compilation per pattern); remove one of them")
    if not cfg.fused_backward_pass:
        return
    if cfg.gradient_accumulation_steps > 1:
        errors.add("fused_backward_pass", f"steps each weight inside backward, so it cannot sum gradients over "
                   f"`gradient_accumulation_steps` {cfg.gradient_accumulation_steps}: set it to 1 (as sd-scripts)")
    name = optimizer_named(cfg.optimizer_type)
    if name is not None and name not in PER_WEIGHT_OPTIMIZERS:
        errors.add("fused_backward_pass", f"steps one weight at a time, but {name} sets its step size from all "
                   f"weights' gradients together; use one of {', '.join(PER_WEIGHT_OPTIMIZERS)}")
    if cfg.mixed_precision == "fp16":
        errors.add("fused_backward_pass", 'with `mixed_precision = "fp16"`: the gradient scaler skips a step only '
                   'after seeing every gradient; use "bf16" (or "no")')
