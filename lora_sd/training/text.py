"""Captions -> text-encoder hidden states, as sd-scripts conditions the U-Net.

`max_token_length` 150 / 225 splits a caption into 2 / 3 chunks of 75 tokens,
each encoded as `<BOS> 75 tokens <EOS/PAD>`, and joins the hidden states back
into `<BOS> 150|225 tokens <EOS>` (152 / 227 positions). `clip_skip = n` takes
the n-th last hidden layer through the final layer norm.
"""

import torch


def tokenize(tokenizer, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """[B, chunks, 77] token ids (chunks = 1 for 75 tokens, 2 for 150, 3 for 225)."""
    chunk = tokenizer.model_max_length  # 77
    if not max_token_length or max_token_length <= chunk - 2:
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=chunk, return_tensors="pt")
        return ids.input_ids[:, None]
    total = max_token_length + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    out = []
    for row in ids:
        chunks = []
        for i in range(1, total - chunk + 2, chunk - 2):  # 1, 76, 151
            c = torch.cat([row[:1], row[i:i + chunk - 2], row[-1:]])
            if not pad_is_eos:  # SD2: "<BOS> ... x <PAD>" ends with <EOS>; "<BOS> <PAD> ..." starts with <EOS>
                if c[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    c[-1] = tokenizer.eos_token_id
                if c[1] == tokenizer.pad_token_id:
                    c[1] = tokenizer.eos_token_id
            chunks.append(c)
        out.append(torch.stack(chunks))
    return torch.stack(out)


def encode(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """[B, chunks, 77] ids -> [B, 77 or chunks*75+2, hidden] hidden states."""
    batch, n_chunks, chunk = input_ids.shape
    flat = input_ids.reshape(-1, chunk).to(next(text_encoder.parameters()).device)
    if clip_skip is None or clip_skip <= 1:
        hidden = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        base = getattr(text_encoder, "module", text_encoder)
        norm = getattr(base, "text_model", base).final_layer_norm
        hidden = norm(out.hidden_states[-clip_skip].to(norm.weight.dtype))
    hidden = hidden.reshape(batch, n_chunks, chunk, -1)
    if n_chunks == 1:
        return hidden[:, 0]
    middle = hidden[:, :, 1:chunk - 1].reshape(batch, n_chunks * (chunk - 2), -1)
    return torch.cat([hidden[:, 0, :1], middle, hidden[:, -1, -1:]], dim=1)


def conditioning(text_encoder, tokenizer, max_token_length=None, clip_skip=None, cached=False):
    """captions -> [B, 77|152|227, hidden]: encoded at each call, or once per caption when `cached`
    (a text encoder that is not trained)."""
    if cached:
        return CachedTextEncoder(text_encoder, tokenizer, max_token_length, clip_skip)
    return lambda captions: encode(text_encoder, tokenize(tokenizer, captions, max_token_length), clip_skip)


class CachedTextEncoder:
    """Hidden states per caption, computed once: for a text encoder that is not trained."""

    def __init__(self, text_encoder, tokenizer, max_token_length=None, clip_skip=None, max_entries=100_000):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_token_length, self.clip_skip = max_token_length, clip_skip
        self.cache: dict[str, torch.Tensor] = {}
        self.max_entries = max_entries

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = tokenize(self.tokenizer, missing, self.max_token_length)
            states = encode(self.text_encoder, ids, self.clip_skip)
            if len(self.cache) + len(missing) > self.max_entries:
                self.cache.clear()
            self.cache.update(zip(missing, states))
        return torch.stack([self.cache[c] for c in captions])
