"""Captions -> the U-Net's text conditioning, as sd-scripts computes it: (context, pooled).

SD 1.x/2.x: context = the text encoder's last hidden states (`clip_skip = n`:
the n-th last layer through the final layer norm); pooled is None.
SDXL (sd-scripts' get_hidden_states_sdxl): context = the penultimate hidden
states of both text encoders (no final norm) concatenated along the features;
pooled = text encoder 2's projected pooled output (`text_embeds`) of the first
chunk. SDXL ignores clip_skip, as sd-scripts does.

`max_token_length` 150 / 225 splits a caption into 2 / 3 chunks of 75 tokens,
each encoded as `<BOS> 75 tokens <EOS/PAD>`, and joins the hidden states back
into `<BOS> 150|225 tokens <EOS>` (152 / 227 positions); both SDXL tokenizers
are chunked alike.

`weighted_captions`: (word:1.2) syntax, each token's output scaled by its
weight (lora_sd.training.caption_weights).
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
    return chunk_ids(tokenizer, ids)


def chunk_ids(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """[B, 152 or 227] ids `<BOS> ... <EOS> <PAD>...` -> [B, chunks, 77], each chunk `<BOS> 75 ids <EOS/PAD>`."""
    chunk, total = tokenizer.model_max_length, ids.shape[1]
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    out = []
    for row in ids:
        chunks = []
        for i in range(1, total - chunk + 2, chunk - 2):  # 1, 76, 151
            c = torch.cat([row[:1], row[i:i + chunk - 2], row[-1:]])
            if not pad_is_eos:  # SD2/SDXL te2: "<BOS> ... x <PAD>" ends with <EOS>; "<BOS> <PAD> ..." starts with <EOS>
                if c[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    c[-1] = tokenizer.eos_token_id
                if c[1] == tokenizer.pad_token_id:
                    c[1] = tokenizer.eos_token_id
            chunks.append(c)
        out.append(torch.stack(chunks))
    return torch.stack(out)


def _join_chunks(hidden: torch.Tensor, batch: int, n_chunks: int) -> torch.Tensor:
    """[B*chunks, 77, C] -> [B, 77 or chunks*75+2, C]: <BOS>, each chunk's 75 inner states, the last <EOS>."""
    chunk = hidden.shape[1]
    hidden = hidden.reshape(batch, n_chunks, chunk, -1)
    if n_chunks == 1:
        return hidden[:, 0]
    middle = hidden[:, :, 1:chunk - 1].reshape(batch, n_chunks * (chunk - 2), -1)
    return torch.cat([hidden[:, 0, :1], middle, hidden[:, -1, -1:]], dim=1)


def _flat(text_encoder, input_ids):
    return input_ids.reshape(-1, input_ids.shape[-1]).to(next(text_encoder.parameters()).device)


def encode(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """SD 1.x/2.x: [B, chunks, 77] ids -> [B, 77 or chunks*75+2, hidden] hidden states."""
    flat = _flat(text_encoder, input_ids)
    if clip_skip is None or clip_skip <= 1:
        hidden = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        base = getattr(text_encoder, "module", text_encoder)
        norm = getattr(base, "text_model", base).final_layer_norm
        hidden = norm(out.hidden_states[-clip_skip].to(norm.weight.dtype))
    return _join_chunks(hidden, input_ids.shape[0], input_ids.shape[1])


def encode_sdxl(text_encoder, text_encoder_2, ids_1, ids_2) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: ([B, L, C1 + C2] penultimate states of both encoders, [B, P] te2's pooled projection)."""
    batch, n_chunks = ids_1.shape[:2]
    h1 = text_encoder(_flat(text_encoder, ids_1), output_hidden_states=True, return_dict=True).hidden_states[-2]
    out2 = text_encoder_2(_flat(text_encoder_2, ids_2), output_hidden_states=True, return_dict=True)
    pooled = out2.text_embeds.reshape(batch, n_chunks, -1)[:, 0]  # sd-scripts: the first chunk's pool
    context = torch.cat([_join_chunks(h1, batch, n_chunks), _join_chunks(out2.hidden_states[-2], batch, n_chunks)],
                        dim=-1)
    return context, pooled


class TextEncoders:
    """captions -> (context [B, L, C], pooled [B, P] or None): the model family's text conditioning.

    `encoders`/`tokenizers`: one of each (SD 1.x/2.x) or two (SDXL)."""

    def __init__(self, encoders, tokenizers, max_token_length=None, clip_skip=None, weighted=False):
        self.encoders, self.tokenizers = list(encoders), list(tokenizers)
        self.max_token_length, self.clip_skip, self.weighted = max_token_length, clip_skip, weighted

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    def __call__(self, captions: list[str]):
        if not self.weighted:
            ids = [tokenize(t, captions, self.max_token_length) for t in self.tokenizers]
            if self.sdxl:
                return encode_sdxl(*self.encoders, *ids)
            return encode(self.encoders[0], ids[0], self.clip_skip), None
        from lora_sd.training.caption_weights import weighted_tokens

        ids, weights = zip(*(weighted_tokens(t, captions, self.max_token_length, chunk_ids) for t in self.tokenizers))
        # [B, chunks, 77] weights -> [B, L, 1] at the hidden states' positions (joined as the states are)
        joined = [_join_chunks(w.reshape(-1, w.shape[-1], 1), *w.shape[:2]) for w in weights]
        if not self.sdxl:
            context = encode(self.encoders[0], ids[0], self.clip_skip)
            return context * joined[0].to(context), None
        context, pooled = encode_sdxl(*self.encoders, *ids)
        width = getattr(self.encoders[0], "module", self.encoders[0]).config.hidden_size  # te1's part of the features
        scale = torch.cat([joined[0].expand(-1, -1, width), joined[1].expand(-1, -1, context.shape[-1] - width)], -1)
        return context * scale.to(context), pooled

    def cache_id(self) -> str:
        """What a cached output depends on besides its caption: the weights, the vocabularies, the options."""
        import hashlib
        import json

        from lora_sd.data.latents import weights_fingerprint

        h = hashlib.sha256(weights_fingerprint(*self.encoders).encode())
        for t in self.tokenizers:
            h.update(json.dumps(sorted(t.get_vocab().items())).encode())
            h.update(f"{t.pad_token_id}|{t.model_max_length}".encode())
        h.update(f"{self.max_token_length}|{None if self.sdxl else self.clip_skip}".encode())
        if self.weighted:  # other outputs for the same caption (unweighted ids keep their former cache)
            h.update(b"|weighted-captions")
        return h.hexdigest()


def conditioning(encoders, tokenizers, max_token_length=None, clip_skip=None, cached=False, cache_dir=None,
                 weighted=False):
    """captions -> (context, pooled|None): encoded at each call, or once per caption when `cached` (text encoders
    that are not trained), kept in memory and, with `cache_dir`, on disk (lora_sd.training.text_cache).
    `weighted`: weighted captions (the weights are a function of the caption, so cached outputs stay right)."""
    fn = TextEncoders(encoders, tokenizers, max_token_length, clip_skip, weighted)
    if not cached:
        return fn
    from lora_sd.training.text_cache import CachedTextEncoder

    return CachedTextEncoder(fn, cache_dir)
