"""How the prepared dataset reaches the training workers: both splits read once by the driver
into the object store. Val is a Ray Dataset split across the workers every epoch, every row
exactly once. Train is either one object per rank (shards that fit in memory: the same rows for
a rank wherever it runs) or a Ray Dataset split in equal shards every epoch (streamed). The
workers' side is segray/worker.py."""

from __future__ import annotations

import math

from segray import storage
from segray.dataset import COL_IMAGE, COL_LABEL, DatasetInfo, split_files
from segray.worker import TRAIN_SPLIT, VAL_SPLIT

BLOCK_BYTES = 32 * 1024 * 1024  # Ray Data block size of the training data in the object store


def training_datasets(data: str, info: DatasetInfo, num_workers: int, cache_train: bool = False) -> tuple[dict, list]:
    """Both splits in the object store: ``({split: Ray Dataset}, train shards)``.

    Read once, by the driver, with pyarrow, not with ``ray.data.read_parquet``: a streaming read
    needs CPUs for its read tasks every epoch, and where the workers hold every CPU (a CPU box)
    they never get one and the run hangs; materialising such a read first was much slower than
    the driver's read (docs/benchmarks.md, "Training"). Every epoch then streams from memory,
    split across the workers by Ray Data, instead of from object storage. (A dataset larger than
    the object store would need streaming reads and spare CPUs for them.)

    With ``cache_train`` (the workers keep their shards in memory: train.shard_cache_fits) the
    train split is not a Dataset but one object per rank, rows ``rank, rank + N, ...`` of the
    split (N workers; the last ``rows % N`` rows left out, as an equal split does): every rank
    gets the same rows whatever node it runs on and whoever asks first, so a run is the same on
    one node or several, and a restart finds its shard again.
    """
    import numpy as np
    import pyarrow.parquet as pq
    import ray

    out, shards = {}, []
    fs, _ = storage.resolve(data)
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        # Exactly the files dataset.json lists: the folder may hold others (prepare's leftovers).
        paths = [storage.resolve(u)[1] for u in split_files(data, info, split)]
        table = pq.read_table(paths, filesystem=fs, columns=[COL_IMAGE, COL_LABEL])
        if split == TRAIN_SPLIT and cache_train:
            each = table.num_rows // num_workers
            shards = [ray.put(table.take(np.arange(r, each * num_workers, num_workers))) for r in range(num_workers)]
            continue
        # Several blocks per worker, so that the val split (not split equally) is shared out evenly.
        blocks = max(4 * num_workers, math.ceil(table.nbytes / BLOCK_BYTES))
        rows = max(1, math.ceil(table.num_rows / blocks))
        out[split] = ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)])
    return out, shards


def data_config():
    """train (when a Dataset): equal shards (DDP hangs when ranks take different numbers of
    steps); val: every row exactly once (an equal split would drop rows and bias the metrics)."""
    import ray.train

    class ShardConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            val = datasets.get(VAL_SPLIT)
            rest = {k: v for k, v in datasets.items() if k != VAL_SPLIT}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if val is not None:
                for i, it in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][VAL_SPLIT] = it
            return out

    return ShardConfig(datasets_to_split=[TRAIN_SPLIT, VAL_SPLIT])
