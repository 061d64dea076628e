"""Show what is inside a LoRA: format, kind, base model, components, ranks and alphas, delta norms, NaN/inf, metadata.

    python recipes/lora_info.py lora.safetensors [--top 10] [--json]

Reads every format lora-sd reads (kohya, diffusers file or folder, PEFT adapter folder) and every kind
(LoRA, LoCon, LoHa, LoKr, DoRA). The delta norms are Frobenius norms of each module's weight change
(alpha / rank included), largest first; a file holding NaN/inf is described (the modules and counts),
not refused. The training metadata (sd-scripts' ss_* keys) is shown decoded: dataset folders, tag
frequencies summarised, bucket resolutions, dates, hashes. --json prints all of it as one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_sd.cli import run_main  # noqa: E402
from lora_sd.errors import ConfigError  # noqa: E402
from lora_sd.info import format_info, lora_info  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="LoRA file, diffusers LoRA folder or PEFT adapter folder")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest delta norms to list")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for tools)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.top < 0:
        raise ConfigError(f"--top {args.top}: must be 0 or more")
    info = lora_info(args.file, args.top)
    print(json.dumps(info, indent=1, ensure_ascii=False) if args.json else format_info(info))


if __name__ == "__main__":
    sys.exit(run_main(main))
