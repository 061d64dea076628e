"""The adapted module set must equal what sd-scripts' networks.lora creates, name for name."""

import pytest

from lora_sd.formats.names import kohya_name
from lora_sd.targets import NetworkSpec, lora_configs

# The tiny SD1 U-Net, written out by hand from its config (lora_sd.tiny.unet_config).
TRANSFORMERS = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
IN_TRANSFORMER = [
    "proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    *[f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")],
]
# resnet -> has conv_shortcut (channel count changes, or a skip connection is concatenated)
RESNETS = {
    "down_blocks.0.resnets.0": False, "down_blocks.1.resnets.0": True,
    "mid_block.resnets.0": False, "mid_block.resnets.1": False,
    "up_blocks.0.resnets.0": True, "up_blocks.0.resnets.1": True,
    "up_blocks.1.resnets.0": True, "up_blocks.1.resnets.1": True,
}
SAMPLERS = ["down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"]
TE = [f"text_model_encoder_layers_{i}_{m}" for i in range(3)
      for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]


def expected(conv: bool, unet=True, te=True):
    """{kohya name: is 3x3 conv} by sd-scripts' rules."""
    names = {}
    if unet:
        for t in TRANSFORMERS:
            names.update({f"lora_unet_{t}.{m}": False for m in IN_TRANSFORMER})
        if conv:
            for r, shortcut in RESNETS.items():
                names.update({f"lora_unet_{r}.conv1": True, f"lora_unet_{r}.conv2": True, f"lora_unet_{r}.time_emb_proj": False})
                if shortcut:
                    names[f"lora_unet_{r}.conv_shortcut"] = False
            names.update({f"lora_unet_{s}": True for s in SAMPLERS})
    if te:
        names.update({f"lora_te_{n}": False for n in TE})
    return {k.replace(".", "_"): v for k, v in names.items()}


def created(tiny, spec, **kw):
    configs = lora_configs(tiny.unet, tiny.text_encoder, spec, **kw)
    out = {}
    for component, config in configs.items():
        model = tiny.unet if component == "unet" else tiny.text_encoder
        for name in config.target_modules:
            rank = config.rank_pattern.get(name, config.r)
            alpha = config.alpha_pattern.get(name, config.lora_alpha)
            key = kohya_name(f"{component}.{'text_model.' + name if component == 'text_encoder' else name}")
            out[key] = (rank, alpha, dict(model.named_modules())[name].weight.dim() == 4 and
                        dict(model.named_modules())[name].kernel_size != (1, 1))
    return out


@pytest.mark.parametrize("conv,kw", [
    (False, {}), (True, {}),
    (False, {"train_text_encoder": False}), (True, {"train_text_encoder": False}),
    (False, {"train_unet": False}),
])
def test_module_set_matches_sd_scripts(tiny_sd1, conv, kw):
    spec = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=3 if conv else None, conv_alpha=1.5)
    got = created(tiny_sd1, spec, **kw)
    want = expected(conv, unet=kw.get("train_unet", True), te=kw.get("train_text_encoder", True))
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for name, is_3x3 in want.items():
        rank, alpha, got_3x3 = got[name]
        assert got_3x3 == is_3x3, name
        assert (rank, alpha) == ((3, 1.5) if is_3x3 else (4, 2)), name


def test_conv_alpha_defaults_to_one():
    assert NetworkSpec(conv_dim=8).conv_alpha == 1.0
    assert (NetworkSpec().network_dim, NetworkSpec().network_alpha) == (4, 1.0)


def test_alpha_zero_means_alpha_equals_rank():
    """sd-scripts' LoRAModule: alpha 0 (or None) is alpha = lora_dim, for conv_alpha too."""
    spec = NetworkSpec(network_dim=8, network_alpha=0, conv_dim=3, conv_alpha=0)
    assert (spec.network_alpha, spec.conv_alpha) == (8.0, 3.0)
    assert NetworkSpec(network_dim=8, network_alpha=None).network_alpha == 8.0
    assert NetworkSpec(network_dim=8, network_alpha=2, conv_dim=3, conv_alpha=0.5).conv_alpha == 0.5


def test_peft_adapts_exactly_the_listed_modules(tiny_sd1):
    import copy

    from peft.tuners.lora import LoraLayer

    unet = copy.deepcopy(tiny_sd1.unet)
    config = lora_configs(unet, None, NetworkSpec(conv_dim=2), train_text_encoder=False)["unet"]
    listed = set(config.target_modules)  # PEFT may shorten target_modules in place on injection
    unet.add_adapter(config)
    adapted = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == listed
    assert len(adapted) == sum(1 for v in expected(True, te=False).values())
