"""grain loaders over the framework-free sources of `qvl_core.data`.

The order of records is fixed by the source (`TrainSource` maps stream positions
to records), so grain only shards positions over processes, batches, runs the
decode/augment in workers and keeps a checkpointable iterator. Process p of P
reads positions p, p+P, p+2P, ...; its k-th batch and the other processes' k-th
batches together are positions [k*B, (k+1)*B) of the stream, whatever P is.
"""

from __future__ import annotations

import grain


def _absl_parsed() -> None:
    # grain's worker processes read absl flags; unparsed flags raise UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


READ_BUFFER = 4  # batches a read pipeline (here or in a worker) decodes ahead: make_loader's default prefetch
WORKER_BUFFER = 2  # batches each worker process queues for this one


def read_ahead(num_workers: int, prefetch: int = READ_BUFFER) -> int:
    """A bound on the batches a loader decodes beyond the one the trainer asks for: each worker's read buffer
    and output queue, and this process's read buffer. grain's worker processes leave the shared memory of
    their last batches behind when the source runs out under them (Python's resource tracker then warns about
    leaked `shared_memory` objects at exit), so training sources run this much past the last step: the
    workers never run out, and closing the iterator frees what they decoded ahead."""
    return (num_workers + 1) * (prefetch + WORKER_BUFFER)


def make_loader(
    source,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = READ_BUFFER,
    drop_remainder: bool = True,
    start_batch: int = 0,
) -> grain.IterDataset:
    """Per-process batches of `source` (a random-access qvl source).

    `batch_size` is this process's share of the global batch. `num_workers` > 0
    decodes in that many spawned processes (the entry point needs an
    `if __name__ == "__main__":` guard); 0 decodes in `num_threads` threads here.
    Iterate with `iter(...)`; the iterator's `get_state()` / `set_state()`
    save and restore its position exactly. `start_batch` skips that many of this
    process's batches without reading them (resuming under another process count,
    where the saved iterator states do not apply).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if start_batch:
        ds = ds[start_batch:]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=prefetch))
    if num_workers > 0:
        _absl_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=WORKER_BUFFER)
        it = it.mp_prefetch(options)
    return it
