"""sd-scripts' `torch_compile` / `dynamo_backend`: the trained parts' forward through torch.compile.

sd-scripts hands `dynamo_backend` to accelerate, whose prepare() compiles every model it prepares: the U-Net
and the text encoders that are trained. Here torch.compile wraps the same parts, after accelerate.prepare
(over the DDP wrapper, as accelerate does), but only the callables the loss calls: `LoraTraining.models`
stay the plain modules, so training states, saved files, the EMA and sampling never see a compiled wrapper
or its `_orig_mod.` names.

Shapes: aspect-ratio buckets give the U-Net another latent size per bucket (and the last batch of a bucket
may be smaller). `dynamic=None` (torch's automatic dynamic shapes) compiles once for the first shape, once
more with the changed sizes symbolic at the first other shape, and then serves every bucket: the number of
compilations does not grow with the buckets (tests/test_speed_compile.py counts them). `dynamic=False`
would compile per bucket until torch's recompile limit (8), then silently run uncompiled.

Measured on the tiny model with the eager backend (tests/test_speed_compile.py, 3 buckets): 2 compilations
with dynamic=None, 3 with dynamic=False (one per bucket), 1 with dynamic=True (symbolic from the first step).
Gradient checkpointing, fp8_base, rank_dropout and a per-dataset network_multiplier (PEFT's set_scale: one
more compilation per value) compile without graph breaks; the validation loss (eval mode) adds one
compilation; fused_backward_pass compiles as without it. PEFT's LoHa/LoKr layers (a random draw in their
forward) and DoRA layers break the graph at every layer: they train, compiled in pieces (a warning says so).

Refused before the model loads (ConfigError, one line): a backend this torch does not have or cannot run
here (inductor needs a C++ compiler on CPU and triton on CUDA; cudagraphs needs CUDA; onnxrt, fx2trt:
their packages), and with `torch_compile` the options that break it (config/validate.py `_check_compile`).
"""

import importlib.util
import logging
import shutil

from lora_sd.config.validate import DYNAMO_BACKENDS
from lora_sd.errors import ConfigError

logger = logging.getLogger(__name__)

# the package a backend needs beyond torch
_BACKEND_PACKAGES = {"onnxrt": "onnxruntime", "fx2trt": "torch_tensorrt"}
# torch's automatic dynamic shapes (see above); not True, which makes every size symbolic from the first step
# (inductor then specialises less for a run with one bucket) to save one compilation
DYNAMIC = None


def check_compile(cfg, device_type: str):
    """Refuse `torch_compile` where it cannot run on `device_type` ("cpu" or "cuda"); nothing when it is off."""
    if not cfg.torch_compile:
        return
    import torch._dynamo

    backend = cfg.dynamo_backend
    why = _unavailable(backend, device_type, set(torch._dynamo.list_backends(exclude_tags=())))
    if why:
        raise ConfigError(f"`dynamo_backend = \"{backend}\"` cannot run here: {why}; use \"inductor\" where it can "
                          "run, \"aot_eager\" or \"eager\" (no speed-up), or remove `torch_compile`")


def _unavailable(backend: str, device_type: str, registered: set) -> str | None:
    """Why `backend` cannot compile on `device_type` with this torch, or None."""
    if backend not in registered:
        return f"this torch has no such backend (it has {', '.join(b for b in DYNAMO_BACKENDS if b in registered)})"
    package = _BACKEND_PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return f"it needs the `{package}` package, which is not installed"
    if backend == "cudagraphs" and device_type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if backend == "inductor" and device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor generates triton kernels on CUDA, and triton is not installed (`pip install triton`)"
    if backend == "inductor" and device_type != "cuda":
        from torch._inductor import config

        compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if not shutil.which(compiler or "g++") and not shutil.which("g++") and not shutil.which("clang++"):
            return "inductor builds C++ kernels on CPU, and no C++ compiler (g++ or clang++) is on the PATH"
    return None


def compiled_forward(cfg, models: dict) -> dict:
    """{part: the callable its forward goes through}: torch.compile'd with `torch_compile`, else the module."""
    if not cfg.torch_compile:
        return dict(models)
    import torch

    from lora_sd.training.network import network_args

    args = network_args(cfg)
    kind = "DoRA" if args.get("dora_wd") else {"loha": "LoHa", "lokr": "LoKr"}.get(args.get("algo"))
    if kind:  # measured on the tiny model: ~40-50 graph breaks (LoHa/LoKr: a random draw; DoRA: its weight norm)
        logger.warning("torch_compile with a %s network: PEFT's %s layers break the compiled graph at every layer, "
                       "so compiling gains little", kind, kind)
    logger.info("torch.compile (%s backend) of %s; the first steps compile", cfg.dynamo_backend, "+".join(models))
    return {name: torch.compile(m, backend=cfg.dynamo_backend, dynamic=DYNAMIC) for name, m in models.items()}
