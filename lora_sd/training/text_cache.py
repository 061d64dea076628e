"""Text-encoder outputs cached per caption: sd-scripts' `cache_text_encoder_outputs` (+ `_to_disk`).

For text encoders that are not trained, each caption is encoded once. The
outputs are kept on the CPU (in float32) and moved to the device per batch,
so that the text encoders themselves can leave the device (the memory saving).
On disk (`cache_text_encoder_outputs_to_disk`) they go, like the latent
cache, to the `datasets` cache folder (`<HF datasets cache>/lora_sd_text/
<text-encoder id>/shard-*.safetensors`), not beside the images; the folder is
named by the text encoders' weights, vocabularies and options (TextEncoders.
cache_id) and each entry by its caption, so other weights or another
max_token_length simply miss. Each filling pass appends one shard, written
atomically; safetensors: no pickle is ever read.
"""

import hashlib
import logging
import time
import uuid
from pathlib import Path

import torch

from lora_sd.io import atomic_path

logger = logging.getLogger(__name__)


def default_text_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "lora_sd_text"


def check_cacheable(cfg):
    """sd-scripts' is_text_encoder_output_cacheable: captions that change from step to step cannot be cached.
    `cache_text_encoder_outputs_to_disk` implies `cache_text_encoder_outputs`, as in sd-scripts."""
    from lora_sd.errors import ConfigError

    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        return
    for ds in cfg.datasets:
        for sub in ds.subsets:
            for key in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                        "caption_tag_dropout_rate"):
                if getattr(sub, key):
                    raise ConfigError(f"`cache_text_encoder_outputs` cannot be used with `{key}` (subset "
                                      f"{sub.name}): the captions change every step; turn one of them off")


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class CachedTextEncoder:
    """captions -> (context, pooled|None), each caption encoded once by `encode_fn` (a TextEncoders)."""

    def __init__(self, encode_fn, cache_dir=None, max_entries=100_000):
        self.encode_fn = encode_fn
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.max_entries = max_entries
        self.root = None
        if cache_dir is not None:
            self.root = Path(cache_dir) / encode_fn.cache_id()[:32]
            self._read_shards()

    @property
    def device(self):
        return next(self.encode_fn.encoders[0].parameters()).device

    @torch.no_grad()
    def __call__(self, captions: list[str], device=None):
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing and len(self.cache) + len(missing) > self.max_entries:  # bounded memory: start over
            self.cache.clear()
            missing = list(dict.fromkeys(captions))
        self._encode_missing(missing)
        context = torch.stack([self.cache[c][0] for c in captions]).to(device or self.device)
        if self.cache[captions[0]][1] is None:
            return context, None
        return context, torch.stack([self.cache[c][1] for c in captions]).to(device or self.device)

    def _encode_missing(self, missing: list[str]) -> dict:
        if not missing:
            return {}
        context, pooled = self.encode_fn(missing)
        # one device -> CPU transfer per batch, then a copy per caption (an entry must not keep the batch alive)
        contexts = context.detach().float().cpu().unbind()
        pooleds = [None] * len(missing) if pooled is None else pooled.detach().float().cpu().unbind()
        new = {c: (ctx.clone(), None if p is None else p.clone()) for c, ctx, p in zip(missing, contexts, pooleds)}
        self.cache.update(new)
        return new

    @torch.no_grad()
    def fill(self, captions, batch_size: int = 8) -> int:
        """Encode the captions not cached yet, `batch_size` per call (and write them as one new disk shard);
        returns how many."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        new = {}
        start = time.perf_counter()
        for i in range(0, len(todo), batch_size):
            new.update(self._encode_missing(todo[i:i + batch_size]))
        if self.root is not None and new:
            self._write_shard(new)
        seconds = time.perf_counter() - start
        logger.info("cached %d text-encoder outputs in %.1f s (%.2f captions/s); %d cached in all", len(new), seconds,
                    len(new) / max(seconds, 1e-9), len(self.cache))
        return len(new)

    def _write_shard(self, entries: dict):
        from safetensors.torch import save_file

        tensors = {}
        for caption, (context, pooled) in entries.items():
            key = caption_key(caption)
            tensors[f"{key}.context"] = context.contiguous()
            if pooled is not None:
                tensors[f"{key}.pooled"] = pooled.contiguous()
        self.root.mkdir(parents=True, exist_ok=True)
        # the captions themselves are the keys' preimages: kept as metadata so a shard lists what it holds
        with atomic_path(self.root / f"shard-{uuid.uuid4().hex}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={caption_key(c): c for c in entries})

    def _read_shards(self):
        from safetensors import safe_open

        for shard in sorted(self.root.glob("shard-*.safetensors")) if self.root.is_dir() else []:
            with safe_open(str(shard), "pt") as f:
                names = set(f.keys())
                for key, caption in (f.metadata() or {}).items():
                    if f"{key}.context" in names and caption_key(caption) == key:
                        pooled = f.get_tensor(f"{key}.pooled") if f"{key}.pooled" in names else None
                        self.cache[caption] = (f.get_tensor(f"{key}.context"), pooled)
        if self.cache:
            logger.info("text-encoder output cache: %d caption(s) read from %s", len(self.cache), self.root)
