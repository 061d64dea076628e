"""lora-sd: train and manage LoRA adapters for Stable Diffusion (kohya-compatible files)."""

import logging

# bitsandbytes (imported by PEFT) warns on every start on CPUs with AVX512-BF16
# that an optional hub kernel is missing; we never use its 4-bit CPU path.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"


def load_loras_into_pipeline(pipe, paths, weights=None, merge=False) -> list[str]:
    """Put LoRA files of any kind on a diffusers Stable Diffusion pipeline (SD 1.x, 2.x, SDXL).

    `paths`: one path or a list: kohya / LyCORIS `.safetensors` files (LoRA,
    LoCon, LoHa, LoKr, DoRA), diffusers LoRA files, or PEFT adapter folders.
    `weights`: one multiplier per file (default 1.0 each).

    By default each file becomes a named PEFT adapter (`lora0`, `lora1`, ...,
    skipping names already on the pipeline) and these adapters become the
    pipeline's active set at their weights (`pipe.set_adapters`); the names are
    returned, so `pipe.set_adapters(names, [0.5, 1.0])` re-weights them later
    and `pipe.delete_adapters(names)` removes them. LoHa and LoKr use PEFT's
    LoHa/LoKr layers, which diffusers' own `load_lora_weights` cannot load.
    With `merge=True` the files are added into the model weights instead (no
    adapters, nothing to re-weight; returns []).

    Every module of every file is checked against the pipeline before it
    changes: a file for another model, or a module PEFT cannot hold as an
    adapter (DoRA per input column, LoHa/LoKr with DoRA, a file mixing kinds
    in one model part), raises a `lora_sd.errors.LoraSdError` naming the file
    and module (the last three can be merged: `merge=True`).

        import lora_sd
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained("path/to/model")
        lora_sd.load_loras_into_pipeline(pipe, ["style_loha.safetensors", "char_lokr.safetensors"], [0.7, 0.3])
    """
    import os

    from lora_sd.generate import add_networks
    from lora_sd.ops.merge import load_loras

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    weights = [1.0] * len(paths) if weights is None else list(weights)
    loras, names = load_loras(paths)
    version = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else None
    return add_networks(pipe, loras, weights, merge, names, model_version=version)
