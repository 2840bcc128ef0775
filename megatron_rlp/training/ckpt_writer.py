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

`BackgroundWrite` runs megatron's asynchronous save request (`dist_checkpointing.save(...,
async_sharded_save=True)`) the same way for `--async-save` and for a blocking save: copy the state
to host memory, write it from a thread, then megatron's finalisation once every rank is done.
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


def snapshot_to_host(write_buckets: list) -> list:
    """Copies of every tensor a save will write, in host memory (megatron's `preload_tensors`
    moves GPU tensors but hands CPU tensors through as they are, and a background write of a
    live CPU parameter would record whatever the next optimizer steps make of it)."""
    staged = []
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        copies = [(item, tensor.detach().to("cpu", copy=True)) for item, tensor in tensor_data]
        staged.append((file_name, storage_key, (bytes_data, copies)))
    return staged


class BackgroundWrite:
    """One rank's part of megatron's `AsyncRequest`: its files written by a thread of this
    process from host copies taken at construction, then the request's finalisation."""

    def __init__(self, request):
        self.request = request
        self._args = list(request.async_fn_args)
        self._thread = None
        if request.async_fn is None:  # nothing to write on this rank
            return
        self._args[1] = snapshot_to_host(self._args[1])  # (rank, write buckets, results queue)
        self._thread = threading.Thread(target=request.async_fn, args=self._args,
                                        kwargs=request.async_fn_kwargs, name="ckpt-save",
                                        daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        """Block until this rank's files are written; raise the writers' error, if any, here,
        where every rank agrees on it, instead of in the finalisation's collectives, which the
        other ranks would enter and wait in."""
        if self._thread is None:
            return
        self._thread.join()
        pending_results = self._args[2].queue  # peek: megatron's finalisation reads it later
        if pending_results and isinstance(pending_results[0], BaseException):
            raise pending_results[0]

    def finalize(self) -> None:
        """megatron's finalisation (gathers every rank's write results, writes the global
        `.metadata` and `metadata.json`); collective."""
        for finalize_fn in self.request.finalize_fns:
            finalize_fn()


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
