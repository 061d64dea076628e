"""Functions on LoraWeights: merge (into a model, LoRA+LoRA), SVD merge, extraction.

Every kind (LoRA, LoHa, LoKr, DoRA) merges into a model; SVD merge turns any mix
of LoRA, LoHa and LoKr into a plain LoRA; LoRA+LoRA merge takes plain LoRAs only.

- `merge_loras(loras, ratios, mode="exact"|"kohya")`, `merge_into_models(loras, ratios, models)`
- `svd_merge(loras, ratios, new_rank, new_conv_rank=None)`
- `extract_lora(org_models, tuned_models, dim, conv_dim=None, min_diff=0.01)`
- `resize_lora(lora, new_rank, new_conv_rank=None, dynamic_method=None, dynamic_param=None)`
- the `*_files` variants read and write files (what the recipes call)
- `lowrank`: the tensor math under them; `args`: the checks of their arguments;
  `fit`: the weight shape a module of any kind adapts; `gather`: several LoRAs' modules per key
"""

from lora_sd.ops.args import parse_ratios
from lora_sd.ops.extract import extract_lora, extract_lora_files
from lora_sd.ops.merge import merge_into_model_file, merge_into_models, merge_lora_files, merge_loras
from lora_sd.ops.resize import resize_lora, resize_lora_file
from lora_sd.ops.svd_merge import svd_merge, svd_merge_files

__all__ = [
    "extract_lora",
    "extract_lora_files",
    "merge_into_model_file",
    "merge_into_models",
    "merge_lora_files",
    "merge_loras",
    "parse_ratios",
    "resize_lora",
    "resize_lora_file",
    "svd_merge",
    "svd_merge_files",
]
