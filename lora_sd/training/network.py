"""Put the LoRA network on the base model: PEFT adapters with sd-scripts' targets.

The adapter kind is LoRA (networks.lora), or with `network_module = "lycoris.kohya"`
the `algo` of `network_args`: LoRA/LoCon (DoRA with dora_wd), LoHa, LoKr.
Fresh adapters follow `network_dim`/`network_alpha` (+ `conv_dim`/`conv_alpha`);
`network_weights` loads a LoRA file (any format) as the starting point, with
the file's ranks and alphas (`dim_from_weights`) or checked against the
configured ones. The base weights stay frozen (and may be cast to fp16/bf16);
the LoRA parameters are float32 (bf16/fp16 with full_bf16/full_fp16: precision.py).
"""

import importlib.util
import logging
from contextlib import contextmanager

import torch

from lora_sd.config.kv_args import parse_network_args
from lora_sd.errors import ConfigError
from lora_sd.targets import NetworkSpec, lokr_layout, lora_configs
from lora_sd.training.precision import lora_dtype
from lora_sd.training.regularize import add_lora_dropouts

logger = logging.getLogger(__name__)


# PEFT's adapter parameter names: LoRA (and DoRA's lora_magnitude_vector), LoHa, LoKr
ADAPTER_PARAMS = ("lora_", "hada_", "lokr_")


def is_adapter_param(name: str) -> bool:
    """An adapter parameter (trained, saved in states), not a base-model one."""
    return any(marker in name for marker in ADAPTER_PARAMS)


def network_args(cfg) -> dict:
    """`network_args` ["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": 4, "conv_alpha": 1.0} (+ "algo", ... with
    lycoris.kohya)."""
    return parse_network_args(cfg.network_args, cfg.network_module)


def network_spec(cfg) -> NetworkSpec:
    from lora_sd.blocks import DIMS, LR_WEIGHTS

    args = network_args(cfg)
    algo = {"locon": "lora"}.get(args.get("algo"), args.get("algo", "lora"))
    blocks = tuple((k, args[k]) for k in (*LR_WEIGHTS, "block_lr_zero_threshold", *DIMS) if k in args)
    if blocks:  # the alphas as given: 0 is each module's own rank there
        blocks += (("network_alpha", cfg.network_alpha), ("conv_alpha", args.get("conv_alpha", 1.0)))
    return NetworkSpec(cfg.network_dim, cfg.network_alpha, args.get("conv_dim"), args.get("conv_alpha", 1.0),
                       algo=algo, dora=args.get("dora_wd", False), factor=args.get("factor", -1),
                       decompose_both=args.get("decompose_both", False), use_tucker=args.get("use_tucker", False),
                       rank_dropout=args.get("rank_dropout", 0.0), module_dropout=args.get("module_dropout", 0.0),
                       dropout=cfg.network_dropout or 0.0, blocks=blocks)


def check_attention(cfg):
    """Refuse xformers where it cannot run, before anything is loaded."""
    if not cfg.xformers:
        return
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError("`xformers = true`, but the xformers package is not installed: `pip install xformers` "
                          "(a build matching your torch), or remove the option (PyTorch SDPA is the default)")
    if not torch.cuda.is_available():
        raise ConfigError("`xformers = true` needs a CUDA GPU; on CPU remove the option (SDPA is used)")


def set_attention(unet, cfg):
    """SDPA (diffusers' default processor) unless xformers is asked for (checked by check_attention)."""
    if cfg.xformers:
        unet.enable_xformers_memory_efficient_attention()


def text_encoders(model) -> dict:
    """{"text_encoder": te1, "text_encoder_2": te2 (SDXL)}: the text encoders a model has."""
    return {name: m for name, m in (("text_encoder", model.text_encoder),
                                    ("text_encoder_2", model.text_encoder_2)) if m is not None}


def trained_parts(model, cfg) -> dict:
    """{part name: module} of the parts that get a LoRA: the U-Net and/or every text encoder (sd-scripts'
    SDXL network trains both or neither)."""
    parts = text_encoders(model) if cfg.train_text_encoder else {}
    return {**parts, "unet": model.unet} if cfg.train_unet else parts


def add_network(model, cfg):
    """Add the trained adapter ("default") to the parts being trained; returns the NetworkSpec used.

    A part that `network_weights` holds starts from the file; any other starts fresh.
    """
    from diffusers.training_utils import cast_training_params

    spec = network_spec(cfg)
    models = trained_parts(model, cfg)
    configs = lora_configs(model.unet, model.text_encoder, spec, cfg.train_unet, cfg.train_text_encoder,
                           text_encoder_2=model.text_encoder_2)
    check_fits_model(cfg, model, models, configs)
    start = _network_weights(cfg, spec, models, list(configs), model.version) if cfg.network_weights else {}
    for name, config in configs.items():
        if name in start:
            start[name].apply_to(**{name: models[name]})
            set_dropouts(models[name], spec)
        else:
            models[name].add_adapter(config)
        add_lora_dropouts(models[name], spec.rank_dropout, spec.module_dropout)
        for pname, p in models[name].named_parameters():
            p.requires_grad_(is_adapter_param(pname))
        cast_training_params(models[name], lora_dtype(cfg))  # float32 under any mixed precision, but full_bf16/fp16
    return spec


def store_base_in_fp8(modules):
    """sd-scripts' fp8_base: the frozen Linear/Conv2d weights of the base model stored as float8_e4m3fn (a byte
    per weight), computed in the mixed-precision dtype: autocast casts them for each matmul/conv. Norms,
    embeddings and biases stay in the mixed-precision dtype (CPU autocast does not cast group_norm's weights);
    the LoRA weights stay float32. After add_network, so that PEFT never sees a float8 base weight."""
    count = 0
    for module in modules:
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not is_adapter_param(name):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
                count += m.weight.numel()
    logger.info("fp8_base: %.1f M base weights stored as float8_e4m3fn", count / 1e6)


def check_fp8(cfg):
    """fp8_base where it cannot run: refused before anything is loaded."""
    if not cfg.fp8_base:
        return
    if not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(f"`fp8_base` needs torch >= 2.1 (float8_e4m3fn); this torch is {torch.__version__}")
    if cfg.mixed_precision == "no":
        raise ConfigError('`fp8_base` stores the base model in float8 and computes in the mixed-precision dtype: '
                          'set `mixed_precision = "bf16"` (or "fp16" on a GPU)')


def check_fits_model(cfg, model, models, configs):
    """Options bounded by the loaded model, refused before any adapter is made: `clip_skip` above the text
    encoder's layer count (an IndexError at the first step), and a rank above what every targeted layer can
    have (`network_dim = 100000` would allocate gigabytes of weights that add nothing). A LoKr has no such
    bound: at a rank of half a factor's side or more, that factor is full (its size is the layer's, not the
    rank's), as in LyCORIS."""
    text_config = getattr(model.text_encoder, "config", None)
    layers = getattr(text_config, "num_hidden_layers", None)
    if cfg.clip_skip and layers and cfg.clip_skip > layers:
        raise ConfigError(f"`clip_skip` {cfg.clip_skip} is above the text encoder's {layers} layers; use 1..{layers} "
                          "(2 for anime models)")
    for what, conv in (("network_dim", False), ("conv_dim", True)):
        full_ranks, rank = [], None
        for name, config in configs.items():
            if spec_kind(config) == "lokr":
                continue
            for target in config.target_modules:
                weight = models[name].get_submodule(target).weight  # [out, in] or [out, in, kh, kw]
                if (weight.dim() == 4 and weight.shape[2:] != (1, 1)) != conv:
                    continue
                full_ranks.append(min(weight.shape[0], weight[0].numel()))
                rank = max(rank or 0, config.rank_pattern.get(target, config.r))
        if full_ranks and rank > max(full_ranks):
            raise ConfigError(f"`{what}` {rank} is above the rank of every layer it applies to (at most "
                              f"{max(full_ranks)} in this model); use {max(full_ranks)} or less")


def spec_kind(config) -> str:
    """"lora", "loha" or "lokr": the adapter kind of a PEFT config."""
    return {"LOHA": "loha", "LOKR": "lokr"}.get(str(getattr(config.peft_type, "value", config.peft_type)), "lora")


def set_dropouts(model, spec):
    """rank_dropout / module_dropout on the LoHa/LoKr layers of `model`, network_dropout (lora_dropout) on its LoRA
    layers (a network_weights start: apply_to makes the layers from the file, which knows no dropout)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    for layer in model.modules():
        if isinstance(layer, LycorisLayer):
            for adapter in layer.rank_dropout:
                layer.rank_dropout[adapter], layer.module_dropout[adapter] = spec.rank_dropout, spec.module_dropout
        elif isinstance(layer, LoraLayer) and spec.dropout:
            for adapter in layer.lora_dropout:
                layer.lora_dropout[adapter] = torch.nn.Dropout(p=spec.dropout)


def _network_weights(cfg, spec, models, wanted, version) -> dict:
    """{part: LoraWeights} of the parts in `wanted` that the `network_weights` file holds (refused when the file
    is for another family than the model: SD 1.x/2.x and SDXL are never mixed)."""
    from lora_sd.formats import load_lora
    from lora_sd.formats.base_model import BASE_NAMES, lora_base, same_base
    from lora_sd.lora_weights import LoraWeights

    lora = load_lora(cfg.network_weights)
    base = lora_base(lora)
    if not same_base(base, version):
        raise ConfigError(f"`network_weights` {cfg.network_weights}: a LoRA for {BASE_NAMES[base]}, but the base "
                          f"model is {BASE_NAMES[version]}; give a LoRA trained on this kind of model")
    ignored = [c for c in lora.components if c not in wanted]
    if ignored:
        logger.warning("network_weights %s: its %s modules are not trained in this run and are ignored",
                       cfg.network_weights, " and ".join(ignored))
    parts = {}
    for name in wanted:
        part = LoraWeights({k: m for k, m in lora.modules.items() if k.startswith(name + ".")})
        if not part.modules:
            logger.info("network_weights has no %s modules: starting them fresh", name)
            continue
        _check_kind(part, spec, cfg.network_weights)
        if not cfg.dim_from_weights:
            _check_ranks(part, spec, cfg.network_weights, models[name], name)
        parts[name] = part
    return parts


KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def _check_kind(lora, spec, path):
    """The file's adapters are of the configured kind (a LoHa file cannot start a LoKr network)."""
    want = "dora" if spec.dora else spec.algo
    for key, m in lora.modules.items():
        kind = "dora" if m.dora_scale is not None else m.kind
        if kind != want:
            args = {"lora": "networks.lora, or algo=lora",
                    "dora": "algo=lora with dora_wd=true"}.get(kind, f"algo={kind}")
            raise ConfigError(f"`network_weights` {path}: {key} is a {KIND_NAMES[kind]} module, but this network is "
                              f"{KIND_NAMES[want]}; train it as {args} (network_module = \"lycoris.kohya\" for "
                              "LyCORIS kinds), or start fresh without network_weights")


def _check_ranks(lora, spec, path, model, component):
    """Each module has the rank (LoKr: the factor layout) the configured network gives its layer."""
    from lora_sd.lora_weights import model_module_name

    for key, m in lora.modules.items():
        what = "conv_dim" if m.is_3x3 else "network_dim"
        want = spec.conv_dim if m.is_3x3 else spec.network_dim
        if m.kind == "lokr":
            name = model_module_name(component, key[len(component) + 1:], model)
            layer = dict(model.named_modules()).get(name)
            if layer is None or not hasattr(layer, "weight"):
                continue  # apply_to names the module that does not exist
            if _lokr_layout_of(m) != _lokr_layout_wanted(layer.weight.shape, want, spec):
                raise ConfigError(f"`network_weights` {path}: {key} is a LoKr of another layout than `{what}` {want}, "
                                  f"factor={spec.factor}, decompose_both={spec.decompose_both} give (rank "
                                  f"{m.rank or 'full'}); set those as the file was trained, or `dim_from_weights = "
                                  "true`")
        elif m.rank != want:
            raise ConfigError(f"`network_weights` {path}: {key} has rank {m.rank}, but `{what}` is {want}; "
                              f"set `{what} = {m.rank}` or `dim_from_weights = true`")


def _lokr_layout_of(m):
    """(w1 shape, w1 decomposed, w2 decomposed, rank of the decomposed factors) of a LoKr module."""
    t = m.tensors
    w1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    return w1, "lokr_w1" not in t, "lokr_w2" not in t, m.rank


def _lokr_layout_wanted(weight_shape, rank, spec):
    (w1, w1_low), (_, _, w2_low) = lokr_layout(weight_shape, rank, spec.factor, spec.decompose_both)
    return w1, w1_low, w2_low, rank if (w1_low or w2_low) else None


@contextmanager
def lora_strength(models, multiplier: float):
    """Every LoRA layer of `models` at `multiplier` times its strength inside the block, restored after.

    sd-scripts' `network.set_multiplier`, through PEFT's per-layer `set_scale` (scale = multiplier *
    alpha / rank; `set_scale(1.0)` restores alpha / rank exactly), on LoRA, LoHa and LoKr layers alike. Wrap
    the forward AND the backward: gradient checkpointing recomputes the forward during backward.
    """
    if multiplier == 1.0:
        yield
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer  # LoHa, LoKr: the same set_scale(adapter, multiplier)

    layers = [m for model in models for m in model.modules() if isinstance(m, (LoraLayer, LycorisLayer))]
    if any(any(getattr(m, "use_dora", {}).values()) for m in layers):
        raise ConfigError(f"a DoRA network trains at strength 1 only, but this batch has {multiplier} (a dataset's "
                          "`network_multiplier`?): PEFT's DoRA does not scale its magnitude with a strength")
    for layer in layers:
        for adapter in layer.active_adapters:
            layer.set_scale(adapter, multiplier)
    try:
        yield
    finally:
        for layer in layers:
            for adapter in layer.active_adapters:
                layer.set_scale(adapter, 1.0)


@contextmanager
def dropout_rng(seed: int, device):
    """The global RNG seeded with `seed` inside the block and restored after: PEFT's LoHa/LoKr rank and module
    dropouts draw from it, so a step draws the same masks whether the run was resumed or not (the state's RNG
    is the one after the last save, not the one a straight run has at that step)."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def enable_gradient_checkpointing(model, cfg):
    if not cfg.gradient_checkpointing:
        return
    model.unet.enable_gradient_checkpointing()
    if cfg.train_text_encoder:
        for te in text_encoders(model).values():
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
