"""TrainConfig: every training option under its kohya name, loaded from TOML and the command line.

One dataclass holds the options (defaults as sd-scripts' train_network.py);
`load_config(path, overrides)` reads a TOML file, applies command-line
overrides, checks types and values once and reports every problem together.
`add_config_arguments` generates the command-line flags from the same fields
(`--network_dim 8`, `--xformers`, `--network_args conv_dim=4 conv_alpha=1`).

Accepted TOML shapes: our flat configs (configs/*.toml); sd-scripts'
`--config_file` TOMLs, whose tables ([model_arguments], [training_arguments],
...) are flattened; the dataset tables `[general]` / `[[datasets]]` inline,
or `dataset_config = "file.toml"`, or `train_data_dir` (DreamBooth folders).
"""

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lora_sd.errors import ConfigError, ConfigErrors
from lora_sd.io import read_toml


def opt(default, help=""):
    """A config field with its one-line help (shown by --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- base model
    pretrained_model_name_or_path: str | None = opt(None, "diffusers folder, .safetensors/.ckpt file or hub id")
    v2: bool = opt(False, "the base model is Stable Diffusion 2.x")
    v_parameterization: bool = opt(False, "v-prediction targets (SD 2.x 768-v models)")
    model_config: str | None = opt(None, "configs folder (unet/, vae/, text_encoder/, tokenizer/) for a single file "
                                   "of another architecture than SD 1.5 / 2.1 (lora-sd's own option)")
    # --- data
    dataset_config: str | None = opt(None, "dataset TOML ([general] / [[datasets]] / [[datasets.subsets]])")
    train_data_dir: str | None = opt(None, "DreamBooth folders `N_tokens/` (when no dataset config)")
    reg_data_dir: str | None = opt(None, "regularization folders `N_tokens/`")
    resolution: tuple[int, int] | None = opt(None, "`W,H` or `S`; the datasets' default resolution")
    train_batch_size: int = opt(1, "batch size per device (the datasets' default batch_size)")
    enable_bucket: bool = opt(False, "aspect-ratio buckets")
    min_bucket_reso: int = opt(256, "")
    max_bucket_reso: int = opt(1024, "")
    bucket_reso_steps: int = opt(64, "")
    bucket_no_upscale: bool = opt(False, "")
    caption_extension: str = opt(".caption", "")
    shuffle_caption: bool = opt(False, "")
    keep_tokens: int = opt(0, "")
    flip_aug: bool = opt(False, "")
    color_aug: bool = opt(False, "")
    random_crop: bool = opt(False, "")
    caption_dropout_rate: float = opt(0.0, "")
    caption_dropout_every_n_epochs: int = opt(0, "")
    caption_tag_dropout_rate: float = opt(0.0, "")
    caption_prefix: str | None = opt(None, "")
    caption_suffix: str | None = opt(None, "")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images")
    cache_latents: bool = opt(False, "encode images with the VAE once, in memory")
    cache_latents_to_disk: bool = opt(False, "cache latents on disk too")
    vae_batch_size: int = opt(1, "images per VAE call when caching latents")
    max_data_loader_n_workers: int | None = opt(None, "DataLoader workers (default min(8, cpus-1))")
    persistent_data_loader_workers: bool = opt(False, "")
    max_token_length: int | None = opt(None, "75 (default), 150 or 225 caption tokens")
    clip_skip: int | None = opt(None, "use the text encoder's n-th last layer (2 for anime models)")
    # --- network
    network_module: str = opt("networks.lora", "networks.lora (or lora)")
    network_dim: int = opt(4, "LoRA rank")
    network_alpha: float = opt(1.0, "scale is alpha / rank")
    network_args: list[str] = opt([], "key=value: conv_dim, conv_alpha")
    network_weights: str | None = opt(None, "a LoRA file/folder to continue training from")
    network_multiplier: float = opt(1.0, "strength of the LoRA while training (a dataset's own multiplies it)")
    dim_from_weights: bool = opt(False, "take ranks and alphas from network_weights")
    network_train_unet_only: bool = opt(False, "")
    network_train_text_encoder_only: bool = opt(False, "")
    # --- optimization
    learning_rate: float = opt(1e-4, "")
    unet_lr: float | None = opt(None, "U-Net LoRA learning rate (default learning_rate)")
    text_encoder_lr: float | None = opt(None, "text encoder LoRA learning rate (default learning_rate)")
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov, Adafactor, Prodigy, DAdaptAdam")
    optimizer_args: list[str] = opt([], "key=value, e.g. weight_decay=0.01 betas=0.9,0.99")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    lr_warmup_steps: int = opt(0, "")
    lr_scheduler_num_cycles: int = opt(1, "cycles of cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power of polynomial")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: none)")
    max_train_steps: int = opt(1600, "")
    max_train_epochs: int | None = opt(None, "overrides max_train_steps")
    gradient_accumulation_steps: int = opt(1, "")
    gradient_checkpointing: bool = opt(False, "")
    mixed_precision: str = opt("no", "no, fp16 (GPU only) or bf16; LoRA weights stay float32")
    xformers: bool = opt(False, "xformers attention (PyTorch SDPA is the default)")
    sdpa: bool = opt(False, "PyTorch SDPA attention (the default anyway)")
    seed: int | None = opt(None, "random seed (random when not given; recorded in the outputs)")
    noise_offset: float | None = opt(None, "")
    min_snr_gamma: float | None = opt(None, "")
    min_timestep: int = opt(0, "")
    max_timestep: int = opt(1000, "")
    # --- outputs
    output_dir: str = opt("output", "")
    output_name: str = opt("last", "")
    save_model_as: str = opt("safetensors", "safetensors or ckpt (kohya), diffusers, peft")
    save_precision: str | None = opt(None, "float (default), fp16, bf16")
    save_every_n_epochs: int | None = opt(None, "")
    save_every_n_steps: int | None = opt(None, "")
    save_state: bool = opt(False, "also save the training state (for resume) at each save")
    save_state_on_train_end: bool = opt(False, "save the training state at the end of training (only)")
    resume: str | None = opt(None, "a state folder written by save_state")
    training_comment: str | None = opt(None, "")
    logging_dir: str | None = opt(None, "TensorBoard logs")
    log_prefix: str | None = opt(None, "")
    sample_prompts: str | None = opt(None, "prompt file: one per line, options --n --w --h --d --l --s")
    sample_every_n_steps: int | None = opt(None, "")
    sample_every_n_epochs: int | None = opt(None, "")
    sample_sampler: str = opt("ddim", "ddim, euler, euler_a, dpmsolver++, pndm, lms")
    # --- resolved by load_config, not options
    datasets: list = field(default_factory=list, metadata={"internal": True})
    source: str = field(default="", metadata={"internal": True})

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
OPTION_NAMES = tuple(_FIELDS)
_TYPES = typing.get_type_hints(TrainConfig)
# sd-scripts options we read but do not implement: accepted only at these values.
_ACCEPTED = {"mem_eff_attn": (False,), "lowram": (False,), "full_fp16": (False,), "full_bf16": (False,),
             "no_half_vae": (False, True), "log_with": (None, "tensorboard"), "save_last_n_epochs": (None,),
             "save_last_n_steps": (None,), "save_n_epoch_ratio": (None,), "use_8bit_adam": (False,),
             "use_lion_optimizer": (False,), "network_dropout": (None, 0, 0.0), "scale_weight_norms": (None,),
             "huggingface_repo_id": (None,), "tokenizer_cache_dir": (None,), "vae": (None,),
             "console_log_level": (None,), "sample_at_first": (False,), "zero_terminal_snr": (False,),
             "multires_noise_iterations": (None,), "ip_noise_gamma": (None,), "face_crop_aug_range": (None,),
             "wandb_api_key": (None,), "max_bucket_reso_steps": (None,)}
CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_model_as": ("safetensors", "ckpt", "pt", "diffusers", "peft"),
    "save_precision": (None, "float", "fp16", "bf16"),
    "network_module": ("networks.lora", "lora"),
    "max_token_length": (None, 75, 150, 225),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
}
DATASET_TABLES = ("general", "datasets")


def _base_type(typ):
    """(type, optional) of `int | None` style annotations."""
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typ, False


def _coerce(key, value, errors, from_cli=False):
    """A TOML or command-line value converted to the field's type, or MISSING with an error added."""
    typ, optional = _base_type(_TYPES[key])
    if value is None or (from_cli and optional and value in ("None", "none", "")):
        if optional:
            return None
        errors.add(key, f"must be {_type_name(typ)}, got nothing")
        return dataclasses.MISSING
    try:
        if from_cli and isinstance(value, str) and typ in (int, float):
            value = typ(value)
        if typ is bool and from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if typ in (bool, int, float, str) and type(value) is typ:
            return value
        if typ == list[str] and isinstance(value, (str, list)):
            value = [value] if isinstance(value, str) else value
            if all(isinstance(v, (str, int, float)) for v in value):
                return [str(v) for v in value]
        if typ == tuple[int, int]:
            return _resolution(value)
    except (TypeError, ValueError):
        pass
    errors.add(key, f"must be {_type_name(typ)}, got {value!r}")
    return dataclasses.MISSING


def _resolution(value):
    """512, "512", "512,768", [512, 768] -> (width, height)."""
    if isinstance(value, str):
        value = [int(v) for v in value.split(",")]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = [value[0], value[0]]
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise TypeError
    return tuple(value)


def _type_name(typ):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list[str]: "a list of strings", tuple[int, int]: "a size `W,H` or `S`"}.get(typ, str(typ))


def _flatten(raw: dict, where: str, errors: ConfigErrors) -> tuple[dict, dict]:
    """(options, dataset tables): sd-scripts' config_file tables are flattened into options."""
    flat, dataset = {}, {}
    for key, value in raw.items():
        if key in DATASET_TABLES:
            dataset[key] = value
        elif isinstance(value, dict) and key not in _FIELDS:
            for k, v in value.items():
                if k in flat:
                    errors.add(k, f"is set twice (in [{key}] and before)")
                flat[k] = v
        else:
            if key in flat:
                errors.add(key, "is set twice")
            flat[key] = value
    return flat, dataset


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (or none) plus overrides {option: value}.

    Override values may be typed or command-line strings. Every unknown key,
    wrong type and impossible value is reported in one ConfigError.
    """
    where = str(path) if path else "command line"
    errors = ConfigErrors(where)
    raw = read_toml(path) if path else {}
    flat, dataset_tables = _flatten(raw, where, errors)
    values = {}
    for table, from_cli in ((flat, False), (overrides or {}, True)):
        for key, value in table.items():
            if key in _ACCEPTED:
                if value not in _ACCEPTED[key] and not (from_cli and str(value) in map(str, _ACCEPTED[key])):
                    errors.add(key, "is an sd-scripts option lora-sd does not implement; remove it")
                continue
            if key not in _FIELDS:
                errors.unknown(key, _FIELDS, what="option")
                continue
            value = _coerce(key, value, errors, from_cli=from_cli and isinstance(value, str))
            if value is not dataclasses.MISSING:
                values[key] = value
    cfg = TrainConfig(**values)
    cfg.source = str(path or "")
    _check_values(cfg, errors, bool(dataset_tables))
    errors.raise_if_any()
    cfg.datasets = _datasets(cfg, dataset_tables, path)
    return cfg


def _check_values(cfg: TrainConfig, errors: ConfigErrors, inline_datasets: bool):
    from lora_sd.generate import SAMPLERS  # generation's sampler names serve the training samples too

    for key, allowed in {**CHOICES, "sample_sampler": tuple(SAMPLERS)}.items():
        value = getattr(cfg, key)
        if value not in allowed:
            errors.add(key, f"must be one of {', '.join(str(a) for a in allowed if a is not None)}; got {value!r}")
    from lora_sd.training.optim import OPTIMIZERS

    if cfg.optimizer_type.lower() not in {o.lower() for o in OPTIMIZERS}:
        lower = {o.lower(): o for o in OPTIMIZERS}
        close = [lower[c] for c in difflib.get_close_matches(cfg.optimizer_type.lower(), list(lower), n=1, cutoff=0.4)]
        errors.add("optimizer_type", f"must be one of {', '.join(OPTIMIZERS)}; got {cfg.optimizer_type!r}"
                   + (f" (did you mean `{close[0]}`?)" if close else ""))
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        errors.add("network_train_unet_only", "and `network_train_text_encoder_only` are both set: nothing "
                   "would be trained (set one, or neither to train both)")
    for key in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(cfg, key) < 1:
            errors.add(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps",
                "sample_every_n_epochs", "clip_skip"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            errors.add(key, f"must be >= 1 when given, got {getattr(cfg, key)}")
    for key in ("learning_rate", "lr_warmup_steps", "max_grad_norm", "prior_loss_weight"):
        if getattr(cfg, key) < 0:
            errors.add(key, f"must be >= 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.min_timestep < cfg.max_timestep <= 1000:
        errors.add("min_timestep", f"and `max_timestep` must satisfy 0 <= min < max <= 1000, got "
                   f"{cfg.min_timestep}, {cfg.max_timestep}")
    from lora_sd.training.network import network_args

    try:
        network_args(cfg)
    except ConfigError as e:
        errors.add("network_args", str(e))
    if not cfg.pretrained_model_name_or_path:
        errors.add("pretrained_model_name_or_path", "is required (a diffusers folder or a .safetensors/.ckpt file)")
    sources = [k for k in ("dataset_config", "train_data_dir") if getattr(cfg, k)] + (["[[datasets]]"] if inline_datasets else [])
    if not sources:
        errors.add("dataset_config", "is required: give a dataset TOML, inline [[datasets]] tables or `train_data_dir`")
    elif len(sources) > 1:
        errors.add(sources[0], f"and `{sources[1]}` are both given: use one dataset source")
    if cfg.dim_from_weights and not cfg.network_weights:
        errors.add("dim_from_weights", "needs `network_weights`")


def _datasets(cfg: TrainConfig, tables: dict, path) -> list:
    """The DatasetConfigs, with the options of the same names as the lowest-priority defaults (as sd-scripts)."""
    from lora_sd.data import DatasetConfig, SubsetConfig, dreambooth_dataset_config, load_dataset_config

    shared = [f.name for c in (DatasetConfig, SubsetConfig) for f in dataclasses.fields(c) if f.name in _FIELDS]
    defaults = {k: getattr(cfg, k) for k in shared if getattr(cfg, k) is not None}
    defaults["batch_size"] = cfg.train_batch_size
    if cfg.train_data_dir:
        from lora_sd.demo import resolve_demo_path

        return dreambooth_dataset_config(resolve_demo_path(cfg.train_data_dir),
                                         resolve_demo_path(cfg.reg_data_dir), **defaults)
    if cfg.dataset_config:
        source = Path(cfg.dataset_config)
        if path and not source.is_absolute() and not source.exists() and (Path(path).parent / source).exists():
            source = Path(path).parent / source
        return load_dataset_config(source, defaults=defaults)
    return load_dataset_config(tables, path_for_errors=f"{path} (inline [[datasets]])", defaults=defaults)


# --- command line ---------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser):
    """One flag per TrainConfig field, generated: `--network_dim 8`, `--xformers`, `--network_args a=1 b=2`.

    Only flags actually given end up in the namespace (default SUPPRESS), so
    they override the TOML and nothing else does.
    """
    group = parser.add_argument_group("training options (override the config file)")
    for name, f in _FIELDS.items():
        typ, _ = _base_type(_TYPES[name])
        kw = dict(default=argparse.SUPPRESS, help=f.metadata.get("help") or None)
        if typ is bool:
            group.add_argument(f"--{name}", nargs="?", const="true", metavar="BOOL", **kw)
        elif typ == list[str]:
            group.add_argument(f"--{name}", nargs="*", metavar="ARG", **kw)
        else:
            group.add_argument(f"--{name}", metavar=typ.__name__.upper() if typ in (int, float, str) else "W,H", **kw)
    for name in _ACCEPTED:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def check_unknown_flags(unknown: list[str]):
    """parse_known_args leftovers -> one ConfigError naming each flag and the closest option."""
    flags = [u for u in unknown if u.startswith("--")]
    if not unknown:
        return
    if not flags:
        raise ConfigError(f"command line: unexpected argument(s) {' '.join(unknown)}")
    errors = ConfigErrors("command line")
    known = [f"--{name}" for name in (*_FIELDS, "config")]
    for flag in flags:
        errors.unknown(flag.split("=", 1)[0], known, what="option")
    errors.raise_if_any()


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = set(_FIELDS) | set(_ACCEPTED)
    return {k: v for k, v in vars(args).items() if k in names}
