"""What every recipe does around its one library call: errors as one line, exit 2."""

import logging
import sys

from lora_sd.errors import LoraSdError


def run_main(fn, argv=None):
    """Run `fn(argv)`; a LoraSdError becomes `error: ...` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fn(argv)
    except LoraSdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
