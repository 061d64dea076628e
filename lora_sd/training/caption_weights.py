"""Weighted captions (`weighted_captions`): the prompt-weight syntax sd-scripts reads, and its token weights.

Syntax (the AUTOMATIC1111 attention syntax, as sd-scripts' parse_prompt_attention reads it):
`(text)` x1.1, `[text]` / 1.1, `(text:1.3)` x1.3, nested brackets multiply; a bracket left open applies to
the end; a closing bracket without its opening one, and `\\(`, `\\)`, `\\[`, `\\]`, `\\\\`, are literal text
(a lone backslash is dropped). Runs of text of equal weight are merged.

Each (text, weight) piece is tokenized on its own (no BOS/EOS) and every token gets its piece's weight; the
caption is truncated to max_token_length (75 by default) and laid out as `<BOS> tokens <EOS> <PAD>...` with
weight 1 for BOS, EOS and padding, then split into 77-token chunks as the unweighted ids are. The text encoder's
output at each token is multiplied by its weight (lora_sd.training.text), without renormalising the mean,
as sd-scripts' current encode_tokens_with_weights does. SDXL: each text encoder's output by its own weights;
the pooled output is not weighted.
"""

import logging
import re

import torch

logger = logging.getLogger(__name__)

UP, DOWN = 1.1, 1 / 1.1
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of a caption; [("", 1.0)] for an empty one."""
    pieces: list[list] = []  # [text, weight]
    rounds, squares = [], []  # where each open bracket's range starts in `pieces`

    def scale(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKENS.finditer(text):
        token, number = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            (rounds if token == "(" else squares).append(len(pieces))
        elif number is not None and rounds and _is_number(number):
            scale(rounds.pop(), float(number))
        elif token == ")" and rounds:
            scale(rounds.pop(), UP)
        elif token == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            pieces.append([token, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _weighted_flat(tokenizer, caption: str, length: int) -> tuple[list[int], list[float]]:
    """`<BOS> tokens <EOS> <PAD>...` ids of `length` and their weights (1 outside the caption's tokens)."""
    ids, weights = [], []
    for text, weight in parse_weights(caption):
        piece = tokenizer(text).input_ids[1:-1]
        ids += piece
        weights += [weight] * len(piece)
    if len(ids) > length - 2:
        logger.warning("a weighted caption is longer than %d tokens and was truncated: %.60s", length - 2, caption)
        ids, weights = ids[:length - 2], weights[:length - 2]
    pad = length - 2 - len(ids)
    return ([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
            [1.0] + weights + [1.0] * (pad + 1))


def weighted_tokens(tokenizer, captions: list[str], max_token_length: int | None, chunk_ids):
    """([B, chunks, 77] ids, [B, chunks, 77] weights); `chunk_ids(tokenizer, ids [B, total])` splits the ids into
    chunks as the unweighted tokenization does (lora_sd.training.text)."""
    chunk = tokenizer.model_max_length  # 77
    long = bool(max_token_length) and max_token_length > chunk - 2
    length = max_token_length + 2 if long else chunk
    flat = [_weighted_flat(tokenizer, c, length) for c in captions]
    ids = torch.tensor([i for i, _ in flat])
    weights = torch.tensor([w for _, w in flat])
    if not long:
        return ids[:, None], weights[:, None]
    chunked = torch.ones(len(captions), (length - 2) // (chunk - 2), chunk)
    for c in range(chunked.shape[1]):
        chunked[:, c, 1:chunk - 1] = weights[:, 1 + c * (chunk - 2):1 + (c + 1) * (chunk - 2)]
    return chunk_ids(tokenizer, ids), chunked
