"""Finding the real failure inside an exception raised by torch.distributed.checkpoint.

DCP wraps what a rank raised into a `CheckpointException` (a BaseException) that holds every
rank's failure, sends failures between ranks pickled (which drops `__cause__`), and sometimes
retries and raises something else, keeping the first error only as `__context__`. The loaders
and savers in this package look for one kind of error (our refusal, an OSError) anywhere in that
tree; this module walks it once for all of them.
"""
from __future__ import annotations

from typing import Iterator

from torch.distributed.checkpoint.api import CheckpointException


def failure_chain(error: BaseException, *, suppressed_context: bool = True
                  ) -> Iterator[BaseException]:
    """`error`, then every exception behind it, breadth first and each once: the per-rank
    failures of a CheckpointException, `__cause__`, and `__context__` (also where `raise ... from
    None` suppressed it, unless `suppressed_context=False`)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, CheckpointException):
            todo.extend(failure[0] for failure in current.failures.values())
        todo.append(current.__cause__)
        if suppressed_context or not current.__suppress_context__:
            todo.append(current.__context__)
