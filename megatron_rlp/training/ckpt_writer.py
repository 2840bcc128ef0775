"""Checkpoint files written by threads of the saving process, never by child processes.

Why: megatron-core's torch_dist save strategy (`dist_checkpointing/strategies/filesystem_async.py`,
core_v0.16.1) writes every save, synchronous ones included, from processes *forked* off the trainer,
and collects their results through a `multiprocessing.Manager().Queue()` started with the *spawn*
method: a server process (~270 MB, it re-imports `__main__`) plus multiprocessing's resource
tracker, kept for the rest of the run. None of them dies with its parent. A SIGKILLed trainer left
Manager / resource-tracker pairs behind (12 pairs, 3.1 GB RSS in one adversarial session), and a
forked writer inherits the trainer's SIGTERM handler (which only asks for a graceful stop), so it
ignored SIGTERM while blocked on a queue whose reader was gone.

`InProcessSaveStrategy` keeps megatron's planning, format and files (the same `__R_I.distcp` names
and `.metadata`; loading is untouched) and changes only who writes: one thread per bucket in this
process, results handed over in a plain `queue.Queue`. Threads end with the process, whatever
signal ends it, so a killed run leaves no processes. File writes release the GIL, so the buckets
of one save still overlap.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from functools import partial

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy


def write_buckets_in_threads(transform_list, use_msc: bool, rank: int, write_buckets: list,
                             results_queue) -> None:
    """Drop-in for `FileSystemWriterAsync.write_preloaded_data_multiproc` (same arguments, same
    result on `results_queue`: {bucket index: write results}, or the first exception), with
    threads where upstream forks processes."""
    del rank  # upstream only logs it
    local_results: queue.Queue = queue.Queue()
    pending: queue.Queue = queue.Queue()  # upstream's count_queue: each writer takes one item
    threads = []
    for index, bucket in enumerate(write_buckets):
        pending.put(index)
        threads.append(threading.Thread(
            target=FileSystemWriterAsync.write_preloaded_data,
            args=(transform_list, index, bucket, local_results, pending, True),
            kwargs={"use_msc": use_msc}, name=f"ckpt-writer-{index}", daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcome: dict = {}
    while not local_results.empty():
        index, result = local_results.get_nowait()
        if isinstance(result, BaseException):
            results_queue.put(result)
            return
        outcome[index] = result
    if len(outcome) != len(write_buckets):  # a writer died without reporting (BaseException)
        results_queue.put(RuntimeError(f"checkpoint writer threads reported {len(outcome)} of "
                                       f"{len(write_buckets)} files"))
        return
    results_queue.put(outcome)


@contextlib.contextmanager
def _results_in_a_thread_queue():
    """While megatron prepares a write, hand it a `queue.Queue` where it would start its spawn
    Manager (`_get_write_results_queue`): our writers are threads, so no process is needed."""
    original = filesystem_async._get_write_results_queue
    filesystem_async._get_write_results_queue = queue.Queue
    try:
        yield
    finally:
        filesystem_async._get_write_results_queue = original


class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's default ('torch_dist', 1) save strategy, writing from threads (see module doc).
    Pass as `dist_checkpointing.save(..., sharded_strategy=InProcessSaveStrategy())`."""

    def __init__(self, thread_count: int = 2):
        super().__init__("torch_dist", 1, thread_count=thread_count)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        with _results_in_a_thread_queue():
            return super().async_save(sharded_state_dict, checkpoint_dir)

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        if request.async_fn is None:  # nothing to write on this rank
            return request
        transform_list = [writer.transforms] if hasattr(writer, "transforms") else []
        return request._replace(
            async_fn=partial(write_buckets_in_threads, transform_list, writer.use_msc))
