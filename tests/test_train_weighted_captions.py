"""weighted_captions: sd-scripts' (word:1.2) syntax, each token's text-encoder output scaled by its weight
(SD 1.x with 75 and 150 tokens, SDXL both encoders), cached outputs kept apart, training reads it."""

import pytest
import torch

from lora_sd.training import caption_weights
from lora_sd.training.caption_weights import parse_weights
from lora_sd.training.text import TextEncoders, chunk_ids, encode, encode_sdxl
from lora_sd.training.text_cache import CachedTextEncoder
from tests.test_train import args, assets, train_recipe  # noqa: F401  (assets: a fixture)


@pytest.mark.parametrize("text, want", [  # sd-scripts' parse_prompt_attention examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("unopened) and ]", [("unopened) and ]", 1.0)]),
])
def test_parse_weights_as_sd_scripts(text, want):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


def expected_weights(tokenizer, pieces, length):
    """<BOS> weight 1, each piece's tokens (tokenized alone) at its weight, <EOS> and padding 1."""
    w = [1.0]
    for text, weight in pieces:
        w += [weight] * len(tokenizer(text).input_ids[1:-1])
    return torch.tensor(w + [1.0] * (length - len(w)))


def test_weights_scale_the_text_encoder_output(tiny_sd1):
    te, tok = tiny_sd1.text_encoder, tiny_sd1.tokenizer
    captions = ["a photo of (red:1.5) [cat]", "a photo of red cat"]
    with torch.no_grad():
        weighted, _ = TextEncoders([te], [tok], weighted=True)(captions)
        plain, _ = TextEncoders([te], [tok])(captions)
    w = expected_weights(tok, [("a photo of ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)], 77)
    assert sorted(set(w.tolist())) == pytest.approx([1 / 1.1, 1.0, 1.5])
    ids, _ = caption_weights.weighted_tokens(tok, captions[:1], None, None)
    with torch.no_grad():
        unweighted = encode(te, ids)  # the same tokens, not scaled
    torch.testing.assert_close(weighted[:1], unweighted * w[None, :, None])
    torch.testing.assert_close(weighted[1], plain[1])  # no brackets: exactly the unweighted output


def test_150_tokens_weights_reach_the_second_chunk(tiny_sd1):
    te, tok = tiny_sd1.text_encoder, tiny_sd1.tokenizer
    head = "a photo of red cat, " * 18  # more than 75 tokens: the weighted word lands in chunk 2
    caption = head + "(blue:2) house"
    with torch.no_grad():
        weighted, _ = TextEncoders([te], [tok], max_token_length=150, weighted=True)([caption])
        ids, _ = caption_weights.weighted_tokens(tok, [caption], 150, chunk_ids)
        unweighted = encode(te, ids)
    w = expected_weights(tok, [(head, 1.0), ("blue", 2.0), (" house", 1.0)], 152)
    assert weighted.shape == (1, 152, 32) and (w[76:] == 2).any()
    torch.testing.assert_close(weighted, unweighted * w[None, :, None])


def test_sdxl_weights_both_encoders_not_the_pooled_output():
    from lora_sd.tiny import build_tiny_sd

    xl = build_tiny_sd("sdxl")
    caption = ["a (red:0.5) house"]
    with torch.no_grad():
        context, pooled = TextEncoders([xl.text_encoder, xl.text_encoder_2], [xl.tokenizer, xl.tokenizer_2],
                                       weighted=True)(caption)
        ids = [caption_weights.weighted_tokens(t, caption, None, None)[0] for t in (xl.tokenizer, xl.tokenizer_2)]
        plain, plain_pooled = encode_sdxl(xl.text_encoder, xl.text_encoder_2, *ids)
    w1 = expected_weights(xl.tokenizer, [("a ", 1.0), ("red", 0.5), (" house", 1.0)], 77)
    w2 = expected_weights(xl.tokenizer_2, [("a ", 1.0), ("red", 0.5), (" house", 1.0)], 77)
    torch.testing.assert_close(context[..., :32], plain[..., :32] * w1[None, :, None])
    torch.testing.assert_close(context[..., 32:], plain[..., 32:] * w2[None, :, None])
    torch.testing.assert_close(pooled, plain_pooled)


def test_cached_weighted_outputs_are_kept_apart(tiny_sd1, tmp_path):
    te, tok = tiny_sd1.text_encoder, tiny_sd1.tokenizer
    weighted = CachedTextEncoder(TextEncoders([te], [tok], weighted=True), tmp_path)
    plain = CachedTextEncoder(TextEncoders([te], [tok]), tmp_path)
    assert weighted.root != plain.root
    caption = ["a (red:1.5) cat"]
    weighted.fill(caption)
    with torch.no_grad():
        want, _ = TextEncoders([te], [tok], weighted=True)(caption)
    again = CachedTextEncoder(TextEncoders([te], [tok], weighted=True), tmp_path)
    assert again.cache and torch.equal(again(caption)[0], want)


def test_training_reads_weighted_captions(assets, tmp_path, monkeypatch):  # noqa: F811
    calls, real = [], caption_weights.weighted_tokens
    monkeypatch.setattr(caption_weights, "weighted_tokens", lambda *a: calls.append(a[1]) or real(*a))
    result = train_recipe.main(args(assets, tmp_path / "out", "--weighted_captions"))
    assert result.steps == 2 and len(calls) == 2 and all("sks shape" in c[0] for c in calls)
    calls.clear()
    train_recipe.main(args(assets, tmp_path / "out2"))
    assert not calls
