"""Ctrl-C during training: the step in progress finishes, then the run saves and stops.

A KeyboardInterrupt raised at an arbitrary bytecode could land inside
`optimizer.step()` (half the weights updated) or between it and the schedule
step; resuming from what it left would not be the run. So the first Ctrl-C
only sets a flag that the loop reads at each optimizer-step boundary; the
default handler is back at once, so a second Ctrl-C interrupts immediately
(atomic writes leave nothing partial behind). DataLoader workers forked
inside inherit the handler and ignore the signal, so the step can finish.
"""

import contextlib
import logging
import os
import signal
import threading

import torch

logger = logging.getLogger(__name__)


class StopRequest:
    def __init__(self):
        self.requested = False

    def agreed(self, accelerator) -> bool:
        """Whether to stop now, the same answer on every process (each may have seen the signal or not)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Yield a StopRequest set by the first SIGINT; the previous handler is restored on exit."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # Python lets only the main thread set handlers
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)
    restore = previous if previous is not None else signal.default_int_handler  # None: set outside Python
    owner = os.getpid()

    def first_ctrl_c(signum, frame):
        if os.getpid() != owner:  # a DataLoader worker forked from this process (a terminal signals them all)
            return  # keeps serving batches: the step in progress may still need some
        stop.requested = True
        signal.signal(signal.SIGINT, restore)
        logger.warning("Ctrl-C: finishing this step, then saving and stopping (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, restore)
