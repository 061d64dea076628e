"""The names an option may take, as tables the config checks and the code that implements them imports.

`SAMPLERS` is read by lora_sd.generate (and the training samples),
`OPTIMIZERS` by lora_sd.training.optim: both are plain data (module and
class names as strings), so checking a config imports neither diffusers nor
torch, and the names cannot drift apart (tests/test_config_layers.py builds
each one).
"""

# sd-scripts' --sampler names -> (diffusers scheduler class, extra config)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses its default final_sigmas_type "zero" with the first-order dpmsolver
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SAMPLERS.update({f"k_{k}": v for k, v in SAMPLERS.items() if k in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})

# sd-scripts' optimizer_type names -> (module, class, pip package or None, default kwargs)
OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", None, {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}),
    "Lion": ("bitsandbytes.optim", "Lion", "bitsandbytes", {}),  # 32-bit Lion (lion-pytorch's algorithm)
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes", {}),
    "SGDNesterov": ("torch.optim", "SGD", None, {"momentum": 0.9, "nesterov": True}),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers",
                  {"relative_step": False, "scale_parameter": False, "warmup_init": False}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
}


def optimizer_named(name: str) -> str | None:
    """The OPTIMIZERS key `name` means (sd-scripts matches optimizer names case-insensitively); None if none."""
    return {known.lower(): known for known in OPTIMIZERS}.get(name.lower())


# option -> the values it may take (None: unset)
CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_model_as": ("safetensors", "ckpt", "pt", "diffusers", "peft"),
    "save_precision": (None, "float", "fp16", "bf16"),
    "network_module": ("networks.lora", "lora", "lycoris.kohya"),
    "max_token_length": (None, 75, 150, 225),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "sample_sampler": tuple(SAMPLERS),
    "loss_type": ("l2", "l1", "huber", "smooth_l1"),  # lora_sd.training.loss
    "huber_schedule": ("constant", "exponential", "snr"),
}
