"""sd-scripts' LoRA regularisers on PEFT's layers: rank and module dropout (LoRA/DoRA), and max-norm scaling.

PEFT's LoHa/LoKr layers have rank_dropout / module_dropout of their own (lora_sd.targets passes them);
its LoRA layers have neither, so they are added here as forward hooks, as sd-scripts' LoRAModule does
them, in training mode only (eval and saved files are untouched):
- rank dropout: each sample's down output (lora_A) loses each rank with probability p, the rest scaled
  by 1 / (1 - p);
- module dropout: with probability p the layer skips its LoRA for the whole call (PEFT's adapter switch).
The draws come from the global RNG, which the loop seeds per micro-batch (network.dropout_rng): a
resumed run draws what a straight one does, and gradient checkpointing's recompute (which restores the
RNG) draws the same again.

`scale_weight_norms` (sd-scripts' apply_max_norm_regularization): after each optimizer step, a module whose
delta (up @ down * alpha / rank; LoHa/LoKr: PEFT's delta) has a Frobenius norm above the bound is scaled
down to it, half the scale on each of its two factors.
"""

import functools

import torch


def add_lora_dropouts(model, rank_dropout: float, module_dropout: float):
    """Rank and module dropout hooks on the LoRA (and DoRA) layers of `model`."""
    from peft.tuners.lora import LoraLayer

    if not rank_dropout and not module_dropout:
        return
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if rank_dropout:
            for lora_A in layer.lora_A.values():
                lora_A.register_forward_hook(functools.partial(_rank_dropout, rank_dropout))
        if module_dropout:
            layer.register_forward_pre_hook(functools.partial(_skip_module, module_dropout))
            layer.register_forward_hook(_restore_module)


def _rank_dropout(p, lora_A, inputs, output):
    if not lora_A.training or _dora_weight_pass(lora_A, inputs[0]):
        return None
    ranks = output.shape[1] if output.dim() == 4 else output.shape[-1]
    mask = (torch.rand((output.shape[0], ranks), device=output.device) > p).to(output.dtype)
    if output.dim() == 3:  # [batch, tokens, rank]
        mask = mask.unsqueeze(1)
    elif output.dim() == 4:  # convs: [batch, rank, h, w]
        mask = mask[:, :, None, None]
    return output * mask / (1 - p)


def _dora_weight_pass(lora_A, x) -> bool:
    """PEFT's DoRA (Linear) computes its weight through the layers on an identity matrix: not a batch to drop."""
    n = lora_A.weight.shape[1]
    return x.dim() == 2 and x.shape == (n, n) and torch.equal(x, torch.eye(n, dtype=x.dtype, device=x.device))


def _skip_module(p, layer, inputs):
    if layer.training and not layer.disable_adapters and torch.rand(1).item() < p:
        layer._disable_adapters = True
        layer._lora_sd_skipped = True


def _restore_module(layer, inputs, output):
    if getattr(layer, "_lora_sd_skipped", False):
        layer._disable_adapters = False
        layer._lora_sd_skipped = False


# the two factors of each kind scaled by sqrt(ratio) (LoRA as sd-scripts; LoHa, LoKr: one per product side)
_FACTORS = {"lora": (("lora_A",), ("lora_B",)), "loha": (("hada_w1_a",), ("hada_w2_a",)),
            "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))}


def _factor(layer, names, adapter):
    """The first of `names` this layer has for `adapter` (LoRA: the layer's weight)."""
    for name in names:
        holder = getattr(layer, name, None)
        if holder is not None and adapter in holder:
            item = holder[adapter]
            return item.weight if isinstance(item, torch.nn.Module) else item
    raise KeyError(f"{names} of adapter {adapter}")


def _kind(layer) -> str:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    return "loha" if isinstance(layer, LoHaLayer) else "lokr" if isinstance(layer, LoKrLayer) else "lora"


@torch.no_grad()
def apply_max_norm(models, max_norm: float) -> dict:
    """Scale every adapter module of `models` whose delta's norm is above `max_norm` down to it; the figures
    {"keys_scaled": modules scaled, "average_key_norm", "max_key_norm": of the norms after scaling}."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    scaled, norms = 0, []
    for model in models:
        for layer in model.modules():
            if not isinstance(layer, (LoraLayer, LycorisLayer)):
                continue
            kind = _kind(layer)
            for adapter in layer.active_adapters:
                norm = layer.get_delta_weight(adapter).float().norm()
                clamped = norm.clamp(min=max_norm / 2)  # as sd-scripts: no division by a zero norm
                ratio = clamped.clamp(max=max_norm) / clamped
                if ratio != 1:
                    scaled += 1
                    for f in [_factor(layer, names, adapter) for names in _FACTORS[kind]]:
                        f.mul_(ratio.sqrt().to(f.dtype))
                norms.append(float(norm * ratio))
    if not norms:
        return {"keys_scaled": 0, "average_key_norm": 0.0, "max_key_norm": 0.0}
    return {"keys_scaled": scaled, "average_key_norm": sum(norms) / len(norms), "max_key_norm": max(norms)}
