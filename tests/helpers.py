"""Shared test helpers: random non-zero LoRAs on the tiny models."""

import torch

from lora_sd.lora_weights import LoraWeights
from lora_sd.targets import NetworkSpec, lora_configs


def random_lora(tiny, network_dim=4, network_alpha=2, conv_dim=None, conv_alpha=1, seed=0,
                train_unet=True, train_text_encoder=True, scale=0.1) -> LoraWeights:
    """A LoRA with random lora_A/lora_B on copies of tiny's U-Net and text encoder.

    The models in `tiny` are left untouched (adapters go on deep copies).
    """
    return random_adapted(tiny, network_dim, network_alpha, conv_dim, conv_alpha, seed,
                          train_unet, train_text_encoder, scale)[0]


def random_adapted(tiny, network_dim=4, network_alpha=2, conv_dim=None, conv_alpha=1, seed=0,
                   train_unet=True, train_text_encoder=True, scale=0.1):
    """(LoraWeights, adapted U-Net copy, adapted text-encoder copy): the in-process reference."""
    import copy

    unet, te = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
    spec = NetworkSpec(network_dim, network_alpha, conv_dim, conv_alpha)
    configs = lora_configs(unet, te, spec, train_unet, train_text_encoder)
    models = {"unet": unet, "text_encoder": te}
    return add_random_adapters(models, configs, seed, scale), unet, te


def add_random_adapters(models: dict, configs: dict, seed=0, scale=0.1) -> LoraWeights:
    """Add each config's adapter to its part of `models` with random LoRA weights; the LoRA as LoraWeights."""
    gen = torch.Generator().manual_seed(seed)
    for name, config in configs.items():
        models[name].add_adapter(config)
        with torch.no_grad():
            for pname, p in models[name].named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return LoraWeights.from_peft_models(**{n: models[n] for n in configs})


def text_ids(tiny, prompt="a photo of a cat"):
    return tiny.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids


def model_outputs(tiny_or_parts, unet=None, text_encoder=None, seed=0):
    """(text-encoder hidden states, U-Net output) on a fixed input.

    The U-Net is fed the same fixed conditioning for every model, so the two
    outputs compare the two parts independently.
    """
    unet = unet if unet is not None else tiny_or_parts.unet
    text_encoder = text_encoder if text_encoder is not None else tiny_or_parts.text_encoder
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        te = text_encoder(text_ids(tiny_or_parts))[0]
        out = unet(x, torch.tensor([10]), cond).sample
    return te, out


def outputs_with_loras(tiny, loras, weights, seed=0):
    """model_outputs of copies of tiny's U-Net and text encoder with `loras` as PEFT adapters at `weights`.

    The reference for merges: diffusers' own adapter weighting (`set_adapters`), not our arithmetic.
    """
    pipe = fresh_pipeline(tiny)
    unet, te = pipe.unet, pipe.text_encoder
    names = []
    for i, lora in enumerate(loras):
        lora.apply_to(unet=unet, text_encoder=te, adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    pipe.set_adapters(names, adapter_weights=list(weights))
    return model_outputs(tiny, unet=unet, text_encoder=te, seed=seed)


def fresh_pipeline(tiny):
    """A pipeline over copies of tiny's U-Net and text encoder (adapters on it leave `tiny` alone)."""
    import copy
    import dataclasses

    return dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet), text_encoder=copy.deepcopy(tiny.text_encoder)).pipeline()


def max_diff(a, b):
    """Largest absolute difference over two tuples of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def full_disk_at(monkeypatch, call: int) -> list:
    """safetensors' save_file writes part of its file, then fails with ENOSPC on its `call`-th call (a PEFT
    folder is written with one call per component: the 2nd leaves the 1st written); returns the calls' files."""
    import errno
    from pathlib import Path

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == call:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


def one_error_line(recipe, argv, capsys) -> str:
    """Run a recipe through run_main: asserts exit 2, one `error:` line and no traceback; returns the line."""
    from lora_sd.cli import run_main

    rc = run_main(recipe.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
