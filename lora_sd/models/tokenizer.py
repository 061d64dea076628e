"""The real CLIP tokenizer, offline: built from the BPE file that openai-clip ships.

diffusers' single-file loader would fetch `openai/clip-vit-large-patch14`'s
tokenizer from a hub. The vocabulary is a fact we can rebuild: the PyPI
package `openai-clip` ships `clip/bpe_simple_vocab_16e6.txt.gz`. We find it
without importing `clip` (its `__init__` imports torchvision), write
`vocab.json` / `merges.txt` once into the user's cache folder and load them
with transformers' CLIPTokenizer.
"""

import gzip
import importlib.util
import json
import logging
import os
from pathlib import Path

from ..errors import FormatError
from ..io import atomic_path

logger = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merge lines (after the header line).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 256 * 2 + NUM_MERGES + 2  # 49408
MODEL_MAX_LENGTH = 77
# SD 1.x pads with <|endoftext|>; SD 2.x (OpenCLIP) pads with "!" (id 0). SDXL has both:
# its first tokenizer ("sdxl", for CLIP ViT-L) pads as SD 1.x, its second ("sdxl_2", for OpenCLIP bigG) with "!".
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!", "sdxl": "<|endoftext|>", "sdxl_2": "!"}


def cache_dir():
    """The folder for files we build once: $LORA_SD_CACHE, else $XDG_CACHE_HOME/lora_sd."""
    if os.environ.get("LORA_SD_CACHE"):
        return Path(os.environ["LORA_SD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_sd"


def find_bpe_file():
    """Path of openai-clip's BPE vocabulary, found without importing `clip`."""
    spec = importlib.util.find_spec("clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise FormatError(
        f"the CLIP BPE vocabulary ({BPE_FILE}) was not found; install it with `pip install openai-clip`"
    )


def bytes_to_unicode():
    """CLIP's reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab(merges) -> dict[str, int]:
    """CLIP's vocabulary for BPE `merges` (pairs): the 256 byte characters, the same with `</w>`,
    one token per merge, then <|startoftext|> and <|endoftext|>."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges]
    return {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}


def clip_tokenizer(vocab, merges, version="sd1"):
    """CLIPTokenizer with SD's padding and length; vocab/merges are file paths or in memory (dict, pairs)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab, merges, pad_token=PAD_TOKEN[version], model_max_length=MODEL_MAX_LENGTH)


def write_clip_tokenizer_files(folder, bpe_path=None):
    """Write CLIP's vocab.json and merges.txt (49408 tokens) into `folder`."""
    lines = gzip.open(bpe_path or find_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    vocab = clip_vocab(merges)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in merges)}
    for name, text in files.items():
        # each file atomic: processes building the cache at once write the same bytes and never see half a file
        with atomic_path(Path(folder) / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return Path(folder)


def clip_tokenizer_folder(cache=None):
    """The cached folder with CLIP's vocab.json / merges.txt, built on first use."""
    folder = Path(cache or cache_dir()) / "clip_tokenizer"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        logger.info("building the CLIP tokenizer files in %s", folder)
        write_clip_tokenizer_files(folder)
    return folder


def load_clip_tokenizer(version="sd1", folder=None, cache=None):
    """CLIPTokenizer for SD 1.x ("sd1"), 2.x ("sd2") or SDXL's first ("sdxl") / second ("sdxl_2"), no network.

    `folder` is a saved tokenizer (a diffusers model's `tokenizer/`, loaded
    with its own settings); by default the real CLIP vocabulary, cached under
    `cache` (default `cache_dir()`).
    """
    if folder is not None:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    folder = clip_tokenizer_folder(cache)
    return clip_tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), version)
