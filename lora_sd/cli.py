"""What every recipe does around its one library call: errors as one line, exit 2."""

import logging
import sys

from lora_sd.errors import LoraSdError


def os_error_message(e: OSError) -> str:
    """`path: reason` for a failed file operation (read-only folder, disk full, a path under a file, ...)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def error_message(e: LoraSdError) -> str:
    """The error's one line. An error raised in a DataLoader worker reaches us re-raised by torch with the
    message "Caught X in DataLoader worker process N.\nOriginal Traceback ...": keep the original line only."""
    msg = str(e)
    if "\nOriginal Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]  # "lora_sd.errors.DataError: <the message>"
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def run_main(fn, argv=None):
    """Run `fn(argv)`. A LoraSdError, or an OSError from the file system (an unwritable output, a full
    disk), becomes one `error: ...` line on stderr and exit code 2; Ctrl-C one line and exit code 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fn(argv)
    except LoraSdError as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0
