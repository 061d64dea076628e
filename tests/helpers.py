"""Shared test helpers: random non-zero LoRAs (and LoHa / LoKr / DoRA modules) on the tiny models."""

import math

import torch

from lora_sd.lora_weights import LoraModule, LoraWeights, key_for_module
from lora_sd.targets import NetworkSpec, lora_configs, target_modules


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


def kron_split(n: int) -> tuple[int, int]:
    """(a, n // a) with a the largest divisor of n not above its square root: LoKr's factor sizes."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def random_module(kind, weight_shape, rank=2, alpha=None, gen=None, scale=0.3, lokr="full", tucker=False,
                  dora=None, set_shape=True) -> LoraModule:
    """A module of `kind` ("lora", "loha", "lokr") for a weight of `weight_shape`, with random tensors under
    LyCORIS' names and shapes (what its files hold):

    - lora: lora_down.weight [r, in(, k, k)], lora_up.weight [out, r(, 1, 1)];
    - loha: hada_w1_a [out, r], hada_w1_b [r, in*k*k] (and w2_*): 3x3 convs flattened; with `tucker` (convs)
      hada_t1 [r, r, k, k], hada_w1_a [r, out], hada_w1_b [r, in] (and t2, w2_*);
    - lokr (out = a*b, in = c*d, `kron_split`): `lokr` = "full" (lokr_w1 [a, c], lokr_w2 [b, d(, k, k)]),
      "w2" (lokr_w1 full, lokr_w2_a [b, r] @ lokr_w2_b [r, d*k*k]) or "both" (w1 decomposed as well);
      `tucker` (convs, w2 decomposed): lokr_t2 [r, r, k, k], lokr_w2_a [r, b], lokr_w2_b [r, d].

    `dora` = "output" ([out, 1(, 1, 1)]) or "input" ([1, in(, 1, 1)]) adds a positive dora_scale. `set_shape`
    records the weight's shape (as the file readers do); False leaves a flattened conv's kernel unknown.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=gen) * scale

    out, inp, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    ksize = math.prod(kernel)
    tucker = tucker and ksize > 1
    if kind == "lora":
        t = {"lora_down.weight": rnd(rank, inp, *kernel), "lora_up.weight": rnd(out, rank, *[1] * len(kernel))}
    elif kind == "loha" and tucker:
        t = {"hada_t1": rnd(rank, rank, *kernel), "hada_w1_a": rnd(rank, out), "hada_w1_b": rnd(rank, inp),
             "hada_t2": rnd(rank, rank, *kernel), "hada_w2_a": rnd(rank, out), "hada_w2_b": rnd(rank, inp)}
    elif kind == "loha":
        t = {"hada_w1_a": rnd(out, rank), "hada_w1_b": rnd(rank, inp * ksize),
             "hada_w2_a": rnd(out, rank), "hada_w2_b": rnd(rank, inp * ksize)}
    elif kind == "lokr":
        (a, b), (c, d) = kron_split(out), kron_split(inp)
        t = {"lokr_w1": rnd(a, c)} if lokr != "both" else {"lokr_w1_a": rnd(a, rank), "lokr_w1_b": rnd(rank, c)}
        if lokr == "full":
            t["lokr_w2"] = rnd(b, d, *kernel)
        elif tucker:
            t.update(lokr_t2=rnd(rank, rank, *kernel), lokr_w2_a=rnd(rank, b), lokr_w2_b=rnd(rank, d))
        else:
            t.update(lokr_w2_a=rnd(b, rank), lokr_w2_b=rnd(rank, d * ksize))
    else:
        raise ValueError(kind)
    dora_scale = None
    if dora is not None:
        size = [out, 1] if dora == "output" else [1, inp]
        dora_scale = torch.rand(size + [1] * len(kernel), generator=gen) + 0.5
    return LoraModule.of_kind(kind, t, alpha if alpha is not None else rank, dora_scale,
                              tuple(weight_shape) if set_shape else None)


def random_lycoris(tiny, kind, rank=2, alpha=None, conv=True, seed=0, components=("unet", "text_encoder"),
                   **module_args) -> LoraWeights:
    """`random_module`s of `kind` on every module sd-scripts adapts in tiny's `components` (3x3 convs too with
    `conv`), keyed as LoraWeights keys them; `module_args` go to `random_module`."""
    gen = torch.Generator().manual_seed(seed)
    lora = LoraWeights()
    for component in components:
        model = getattr(tiny, component)
        named = dict(model.named_modules())
        for name in target_modules(component, model, conv):
            shape = tuple(named[name].weight.shape)
            lora.modules[key_for_module(component, name)] = random_module(kind, shape, rank, alpha, gen, **module_args)
    return lora


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
