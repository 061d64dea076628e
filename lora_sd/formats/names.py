"""kohya module names <-> LoraWeights keys.

kohya names are module paths with every `.` turned into `_`, so the way back
needs to know which underscores belong to a name segment (`to_q`,
`transformer_blocks`). The vocabulary below is the set of multi-word segments
in SD 1.x/2.x/XL U-Nets and CLIP text encoders; the longest match wins.

SDXL files name U-Net modules in the original layout (`lora_unet_input_blocks_4_1_...`):
`kohya_name` maps to it and `key_from_kohya` back, through `sdxl_names` (the one map).
"""

from lora_sd.errors import FormatError
from lora_sd.formats.sdxl_names import is_sgm_unet_path, names_for

# kohya prefix -> LoraWeights component
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}
COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

_SEGMENTS = {
    # diffusers U-Net
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "time_embedding", "add_embedding",
    "conv_in", "conv_out", "conv_norm_out", "linear_1", "linear_2", "add_k_proj", "add_v_proj",
    # original (sgm) U-Net, as SDXL kohya files name it
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "text_projection",
}
_MAX_PARTS = max(s.count("_") + 1 for s in _SEGMENTS)


def kohya_name(key: str, sdxl=False, unet_config=None) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`.

    SDXL (as sd-scripts names it): the U-Net in the original layout
    (`lora_unet_input_blocks_4_1_proj_in`), mapped with `unet_config`'s layout
    (SDXL base's when None), and the first text encoder `lora_te1_` (SD 1.x/2.x: `lora_te_`).
    """
    component, path = key.split(".", 1)
    prefix = "lora_te1_" if sdxl and component == "text_encoder" else COMPONENT_PREFIX[component]
    if sdxl and component == "unet":
        path = names_for(unet_config).to_sgm(path)
    return prefix + path.replace(".", "_")


def key_from_kohya(name: str, source="", unet_config=None) -> str:
    """The inverse of `kohya_name`: SD 1.x/2.x names, SDXL's (lora_te1_/lora_te2_, original-layout U-Net
    names, mapped back with `unet_config`'s layout, SDXL base's when None) and diffusers-named SDXL files."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            break
    else:
        raise FormatError(f"{source}: key {name!r} is not a kohya LoRA key (lora_unet_/lora_te_...)")
    words = name[len(prefix):].split("_")
    segments = []
    i = 0
    while i < len(words):
        for n in range(min(_MAX_PARTS, len(words) - i), 0, -1):
            candidate = "_".join(words[i:i + n])
            if n == 1 or candidate in _SEGMENTS:
                segments.append(candidate)
                i += n
                break
    path = ".".join(segments)
    if component == "unet" and is_sgm_unet_path(path):
        try:
            path = names_for(unet_config).from_sgm(path)
        except FormatError as e:
            raise FormatError(f"{source}: key {name!r}: {e}") from None
    return component + "." + path
