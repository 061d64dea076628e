"""The demo's report picture: what the LoRA learned, before/after, and its loss curve.

`output/demo/demo-report.png`, top to bottom: a row of the training images, a row drawn by the
base model for the demo prompt (no LoRA), the same prompt and seeds with the LoRA loaded by
diffusers' `pipe.load_lora_weights`, and the training loss per step (raw in grey, a moving
average in blue). `LAYOUT` gives the boxes, so tests read the picture the way a person does.
"""

import logging
from pathlib import Path

from lora_sd.io import atomic_path

logger = logging.getLogger(__name__)

SEEDS = (0, 1, 2, 3)
TILE = 128  # the 64 px images shown at twice their size
MARGIN, LABEL = 8, 16
CURVE_HEIGHT = 160
ROWS = ("training images: sks shape", "base model, no LoRA (demo prompt)", "with the LoRA (same prompt and seeds)")
GUIDANCE, STEPS = 3.0, 20


def _layout():
    width = 2 * MARGIN + len(SEEDS) * TILE
    boxes, y = {}, MARGIN
    for name in ("training", "before", "after"):
        boxes[name] = [(MARGIN + i * TILE, y + LABEL, MARGIN + (i + 1) * TILE, y + LABEL + TILE)
                       for i in range(len(SEEDS))]
        y += LABEL + TILE + MARGIN
    boxes["curve"] = (MARGIN, y + LABEL, width - MARGIN, y + LABEL + CURVE_HEIGHT)
    return (width, y + LABEL + CURVE_HEIGHT + MARGIN), boxes


SIZE, LAYOUT = _layout()  # (width, height) and name -> box(es) (left, top, right, bottom)


def render_before_after(model_path, lora_path, prompt, seeds=SEEDS):
    """The demo prompt drawn by the base model, then with the LoRA loaded: lists of PIL images, same seeds."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_path), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return [pipe(prompt, height=64, width=64, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(seed)).images[0] for seed in seeds]

    before = draw()
    pipe.load_lora_weights(str(lora_path))
    return before, draw()


def draw_loss_curve(losses, size):
    """The loss per step as a PIL image of `size`: raw values in grey, a moving average in blue, axes, labels."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 40, 6, width - 6, height - 16
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0))
    if not losses:
        return image
    window = max(1, len(losses) // 25)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def points(values):
        n = max(1, len(values) - 1)
        return [(left + 1 + (right - left - 2) * i / n, bottom - 1 - (bottom - top - 2) * (v - low) / span)
                for i, v in enumerate(values)]

    draw.line(points(losses), fill=(190, 190, 190))
    draw.line(points(smooth), fill=(30, 70, 200), width=2)
    draw.text((2, top), f"{high:.3f}", fill=(0, 0, 0))
    draw.text((2, bottom - 10), f"{low:.3f}", fill=(0, 0, 0))
    draw.text((left, bottom + 3), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 3), f"step {len(losses)}", fill=(0, 0, 0))
    return image


def compose_report(training, before, after, losses):
    """The report picture (see the module's docstring) from its parts."""
    from PIL import Image, ImageDraw

    report = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(report)
    for label, name, images in zip(ROWS, ("training", "before", "after"), (training, before, after)):
        boxes = LAYOUT[name]
        draw.text((boxes[0][0], boxes[0][1] - LABEL + 2), label, fill=(0, 0, 0))
        for box, image in zip(boxes, images):
            report.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), box[:2])
    box = LAYOUT["curve"]
    draw.text((box[0], box[1] - LABEL + 2), f"training loss per step ({len(losses)} steps)", fill=(0, 0, 0))
    report.paste(draw_loss_curve(losses, (box[2] - box[0], box[3] - box[1])), box[:2])
    return report


def write_report(path, model_path, lora_path, training_images, losses, prompt):
    """Render before/after, compose the report and write it atomically to `path`; returns (path, after images)."""
    before, after = render_before_after(model_path, lora_path, prompt)
    report = compose_report(training_images[:len(SEEDS)], before, after, losses)
    with atomic_path(path) as tmp:
        report.save(tmp, format="PNG")
    logger.info("demo: wrote %s (training images, before/after the LoRA, loss curve)", path)
    return Path(path), after
