"""Load a Stable Diffusion base model from a diffusers folder, a single file or a hub id; save it back.

`load_base` gives one `SDModel` whatever the source. Single files in the
original layout load with no network: architecture configs are shipped
(`sd_configs.py`) and the CLIP tokenizer is built from a PyPI package's BPE
file (`tokenizer.py`). `save_single_file` writes the original layout again
(`original_layout.py`), keeping keys the converter does not know (EMA
weights, ...) from the user's file; `save_diffusers` writes a folder.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError
from ..io import atomic_path, open_tensor_file, precision_dtype
from ..outputs import TENSOR_FILE_SUFFIXES
from . import sd_configs, single_file
from .original_layout import to_original
from .state_dict_io import load_state_dict, save_state_dict
from .tokenizer import load_clip_tokenizer

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = TENSOR_FILE_SUFFIXES  # a single-file model is any tensor file
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MIN_CLIP_VOCAB = 512  # a CLIP BPE vocabulary holds at least its 256 byte tokens, with and without </w>


@dataclass
class SDModel:
    """A Stable Diffusion 1.x / 2.x / XL base model as diffusers / transformers components.

    `version` is 'sd1', 'sd2' or 'sdxl'; SDXL also fills `text_encoder_2` and `tokenizer_2`.

    `scheduler` is the training noise scheduler (DDPM with SD's betas,
    `v_prediction` when `v_parameterization`). `source` is what it was loaded
    from and `source_format` one of 'diffusers', 'single_file', 'hub'; pass
    `original_state_dict=model.source` to `save_single_file` to keep the
    source file's extra keys.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    version: str
    v_parameterization: bool = False
    source: str = ""
    source_format: str = ""
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG with projection
    tokenizer_2: object = None  # SDXL: pads with "!" (id 0)

    def pipeline(self, scheduler=None):
        """A StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) over these components.

        The sampler is DDIM (Euler for SDXL, as SDXL's own folders have) unless `scheduler` is given.
        """
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.version == "sdxl":
            if scheduler is None:
                scheduler = EulerDiscreteScheduler.from_config(
                    self.scheduler.config, steps_offset=1, timestep_spacing="leading")
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
                add_watermarker=False,
            )
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.scheduler.config, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(
            unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def noise_scheduler(v_parameterization=False):
    """SD's training noise scheduler: DDPM, scaled-linear betas 0.00085..0.012, 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **sd_configs.SCHEDULER, prediction_type="v_prediction" if v_parameterization else "epsilon"
    )


def _version_of_text_config(config):
    # OpenCLIP (SD 2.x) uses gelu, OpenAI CLIP (SD 1.x) quick_gelu: true of the real and the tiny models.
    return "sd2" if getattr(config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def _warn_prediction_type(source, v_parameterization):
    """A folder whose scheduler says v_prediction trained as epsilon is a silent mistake: say so."""
    path = Path(source) / "scheduler" / "scheduler_config.json"
    try:
        prediction = json.loads(path.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
    except (OSError, ValueError):
        return
    if (prediction == "v_prediction") != bool(v_parameterization):
        logger.warning("%s: its scheduler uses %s but v_parameterization=%s", source, prediction, v_parameterization)


def _is_sdxl_unet(unet):
    # SDXL's U-Net takes pooled text embeddings and size/crop time ids: "text_time" conditioning
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _check_subfolders(folder, sdxl):
    """Every component's subfolder is there: transformers 5 makes an empty 2-token tokenizer of a missing one."""
    subs = ("vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    missing = [sub + "/" for sub in subs if not (Path(folder) / sub).is_dir()]
    if sdxl and missing == ["text_encoder/", "tokenizer/"]:
        raise FormatError(f"{folder}: an SDXL folder with text_encoder_2/ only (an SDXL refiner?); only SDXL base "
                          "models and their fine-tunes are supported")
    if missing:
        what = "an SDXL" if sdxl else "a Stable Diffusion"
        raise FormatError(f"{folder}: {what} diffusers folder needs {', '.join(missing)} (not found)")


def _load_pretrained(source, local_files_only, torch_dtype, v2, v_parameterization, source_format):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=local_files_only)
    # float32 unless asked: transformers 5 would otherwise keep a folder's saved dtype ("auto").
    torch_dtype = torch_dtype or torch.float32
    text_encoder_2 = tokenizer_2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **kw)
        if source_format == "diffusers":
            _check_subfolders(source, _is_sdxl_unet(unet))
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        if _is_sdxl_unet(unet):
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", dtype=torch_dtype, **kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
    except (OSError, ValueError) as e:  # (EnvironmentError is OSError)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{source}: could not load a diffusers Stable Diffusion model: {msg}") from None
    for tok, te, sub in ((tokenizer, text_encoder, "tokenizer"), (tokenizer_2, text_encoder_2, "tokenizer_2")):
        if tok is not None and (len(tok) < _MIN_CLIP_VOCAB or len(tok) > te.config.vocab_size):
            # a missing or empty tokenizer/ loads as a 2-token tokenizer without an error: every prompt would be lost
            raise FormatError(f"{source}: its {sub} has {len(tok)} tokens for a text encoder of "
                              f"{te.config.vocab_size}: {sub}/ is missing or broken (it needs vocab.json "
                              "and merges.txt, or tokenizer.json)")
    version = "sdxl" if text_encoder_2 is not None else _version_of_text_config(text_encoder.config)
    single_file.check_version(version, v2, source)
    _warn_prediction_type(source, v_parameterization)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    return SDModel(unet, vae, text_encoder, tokenizer, noise_scheduler(v_parameterization), version,
                   v_parameterization, str(source), source_format, text_encoder_2, tokenizer_2)


def _single_file_tokenizer(path, version, model_config, sub, text_encoder):
    """The shipped CLIP vocabulary (or model_config's `sub`/), checked against the text encoder's size."""
    kind = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl" if sub == "tokenizer" else "sdxl_2"}[version]
    tokenizer = load_clip_tokenizer(kind, sd_configs.tokenizer_folder(model_config, sub))
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise FormatError(f"{path}: tokenizer has {len(tokenizer)} tokens, the text encoder "
                          f"{text_encoder.config.vocab_size}; give a model_config with the right {sub}/")
    return tokenizer


def _load_single_file(path, v2, v_parameterization, model_config, torch_dtype, allow_pickle):
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    version = single_file.detect_version(state_dict, path)
    single_file.check_version(version, v2, path)
    if model_config is not None:
        configs = sd_configs.folder_configs(model_config, version)
    else:
        configs = sd_configs.shipped_configs(version, v_parameterization)
        configs["unet"] = single_file.adapt_unet_config(configs["unet"], state_dict)
    unet, vae, text_encoder, *second = single_file.build_components(state_dict, version, configs, path, torch_dtype)
    tokenizer = _single_file_tokenizer(path, version, model_config, "tokenizer", text_encoder)
    text_encoder_2 = second[0] if second else None
    tokenizer_2 = _single_file_tokenizer(path, version, model_config, "tokenizer_2", text_encoder_2) if second else None
    return SDModel(unet, vae, text_encoder, tokenizer, noise_scheduler(v_parameterization), version,
                   v_parameterization, str(path), "single_file", text_encoder_2, tokenizer_2)


def load_base(path, v2=False, v_parameterization=False, model_config=None, torch_dtype=None, allow_pickle=False):
    """Load an SD 1.x / 2.x / XL base model -> SDModel.

    `path`: a diffusers folder, a single file in the original layout
    (.safetensors, or a .ckpt read with `weights_only=True`), or a hub id
    (through diffusers, when a network is there). SDXL is recognised by itself
    (a folder with text_encoder_2/ and a `text_time` U-Net; a file with
    `conditioner.embedders.*` keys). `v2`: True requires an SD 2.x model; False
    (kohya's default, "not given") detects the version.
    `model_config`: a diffusers-layout folder of configs (and optionally
    `tokenizer/`, SDXL's `text_encoder_2/` and `tokenizer_2/`) used instead of
    the shipped SD 1.5 / 2.1 / XL configs for a single file. Errors are one-line
    `FormatError`/`ConfigError`s naming the file.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "unet" / "config.json").is_file():
            raise FormatError(f"{p}: not a diffusers model folder (no unet/config.json)")
        return _load_pretrained(str(p), True, torch_dtype, v2, v_parameterization, "diffusers")
    if p.is_file() or p.suffix in SINGLE_FILE_SUFFIXES:
        return _load_single_file(p, v2, v_parameterization, model_config, torch_dtype, allow_pickle)
    if _HUB_ID.match(str(path)):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return _load_pretrained(str(path), offline, torch_dtype, v2, v_parameterization, "hub")
    raise FormatError(f"{path}: no such file or folder (and not a hub id)")


def _configs_of(model):
    configs = {
        "unet": dict(model.unet.config),
        "vae": dict(model.vae.config),
        "text_encoder": model.text_encoder.config.to_dict(),
    }
    if getattr(model, "text_encoder_2", None) is not None:
        configs["text_encoder_2"] = model.text_encoder_2.config.to_dict()
    return configs


def _original_reader(original):
    """(keys, get(key)) over the user's file or dict, reading lazily from .safetensors."""
    if original is None:
        return [], None
    if isinstance(original, dict):
        return list(original), original.__getitem__
    keys, get, _ = open_tensor_file(original)
    return keys, get


def original_layout_state_dict(model, original_state_dict=None):
    """The model's weights in the original single-file layout (a dict; nothing written).

    Keys of `original_state_dict` (a dict or a file path) that the model does
    not produce (EMA weights, OpenCLIP's last block, ...) are kept.
    """
    version = getattr(model, "version", None)
    if version not in ("sd1", "sd2", "sdxl"):
        raise FormatError(f"cannot write the original layout for model version {version!r}")
    text_encoder_2 = getattr(model, "text_encoder_2", None)
    core, extras = to_original(
        model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), version, _configs_of(model),
        text_encoder_2.state_dict() if text_encoder_2 is not None else None,
    )
    keys, get = _original_reader(original_state_dict)
    known = set(keys)
    for k, v in extras.items():
        if k not in known:
            core[k] = v
    kept = [k for k in keys if k not in core]
    if kept:
        logger.info("keeping %d keys of the original file the model does not hold (e.g. %s)", len(kept), kept[0])
    for k in kept:
        core[k] = get(k)
    return core


def save_single_file(model, path, save_precision="float", original_state_dict=None):
    """Write `model` (an SDModel, or anything with unet/vae/text_encoder[/text_encoder_2]/version) as one
    original-layout file (SDXL: Stability's SGM layout, `conditioner.embedders.*` text encoders).

    `.safetensors` by extension, else a `.ckpt` pickle; `save_precision`
    float | fp16 | bf16; atomic. `original_state_dict` (dict or path of the
    user's file, e.g. `model.source`) supplies keys to keep.
    """
    if isinstance(original_state_dict, (str, os.PathLike)) and Path(original_state_dict).resolve() == Path(path).resolve():
        # the source's tensors may be memory-mapped from the file being replaced: write a new file
        raise FormatError(f"{path}: refusing to overwrite the file whose keys are being kept; save to a new file")
    sd = original_layout_state_dict(model, original_state_dict)
    return save_state_dict(sd, path, save_precision)


def save_diffusers(model, folder, save_precision="float"):
    """Write `model` as a diffusers folder (atomically), loadable by `from_pretrained` and `load_base`.

    The components are cast to `save_precision` in place (float | fp16 | bf16).
    """
    dtype = precision_dtype(save_precision)
    for m in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if m is not None:
            m.to(dtype)
    with atomic_path(folder) as tmp:
        model.pipeline().save_pretrained(str(tmp))
        for sub in ("text_encoder", "text_encoder_2") if model.text_encoder_2 is not None else ("text_encoder",):
            encoder = getattr(model, sub)
            shutil.rmtree(tmp / sub)  # written again with the names both transformers versions read
            encoder.save_pretrained(str(tmp / sub), state_dict=text_encoder_state_dict_v4(encoder))
        for sub in ("tokenizer", "tokenizer_2") if model.tokenizer_2 is not None else ("tokenizer",):
            _save_tokenizer_vocab(getattr(model, sub), tmp / sub)
    return Path(folder)


# transformers 4 (sd-scripts' stack, older diffusers installs) names CLIPTextModel's weights
# `text_model.embeddings...`; transformers 5 dropped that level and maps the old names when loading,
# but writes them back only for a model it loaded itself (not one built from a single file). Given
# 5's names, transformers 4 loads a randomly initialised text encoder with only a warning.
_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def text_encoder_state_dict_v4(text_encoder):
    """The text encoder's state dict with transformers 4's names (`text_model.` level), whichever version runs."""
    return {("text_model." + k if k.startswith(_TEXT_MODEL_PARTS) else k): v
            for k, v in text_encoder.state_dict().items()}


def _save_tokenizer_vocab(tokenizer, folder):
    """vocab.json + merges.txt beside tokenizer.json: transformers 4's CLIPTokenizer (the class model_index.json
    names) reads only those, and transformers 5 writes only tokenizer.json. The `tokenizers` BPE model writes them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (Path(folder) / "vocab.json").exists():
        backend.model.save(str(folder))
