"""lora-sd: train and manage LoRA adapters for Stable Diffusion (kohya-compatible files)."""

import logging

# bitsandbytes (imported by PEFT) warns on every start on CPUs with AVX512-BF16
# that an optional hub kernel is missing; we never use its 4-bit CPU path.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
