"""The error contract shared by every command-line entry point.

An expected error (bad flags, a missing file, a checkpoint that does not fit) is one line
``<prog>: error: <message>`` on stderr and exit status 2, never a traceback. Under torchrun every
rank raises the same error (checks run identically everywhere, or are agreed on collectively), so
only global rank 0 prints it. The process group is torn down on every path, so a failed rank
does not leave its peers waiting.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Tuple, Type

EXPECTED_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_main(prog: str, body: Callable[[], Optional[int]],
             errors: Tuple[Type[BaseException], ...] = EXPECTED_ERRORS) -> int:
    """Run ``body`` (its return value, default 0, is the exit status) under the contract above."""
    try:
        status = body()
    except errors as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Only a process that imported it can have a group to tear down; importing it now would
        # load megatron-core (seconds, and warnings printed after the error line).
        distributed = sys.modules.get("megatron_rlp.training.distributed")
        if distributed is not None:
            distributed.destroy_distributed()
    return 0 if status is None else status
