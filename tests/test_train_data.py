"""The training input (`mgh_ray.train_data`): the check before any worker starts, and a worker's
batch stream over its shard, on a real Ray Data dataset."""

import pytest

from mgh_ray.benchmarks.training import seed_records
from mgh_ray.train_data import batch_stream, check_dataset


@pytest.mark.integration
def test_training_data_is_checked_and_streamed_pass_after_pass(ray_cluster):
    import ray.data

    records = seed_records(10)
    ds = ray.data.from_pandas(records)
    assert sum(check_dataset(ds, 4, 2, 4).values()) == 10
    for column in ("neg_4", "instruction"):  # the instruction is what the rows are counted by
        with pytest.raises(ValueError, match=rf"records lack columns \['{column}'\]"):
            check_dataset(ds.drop_columns([column]), 4, 2, 4)
    with pytest.raises(ValueError, match="cannot fill one step of 2 workers x batch_size 8"):
        check_dataset(ds, levels=4, num_workers=2, batch_size=8)
    stream = batch_stream(ds.iterator(), 4, seed=1, rank=0, start=0)
    batches = [next(stream) for _ in range(4)]  # 10 rows, batches of 4: 2 full batches per pass
    assert all(len(b) == 4 for b in batches)
    for first, second in (batches[:2], batches[2:]):
        ids = [*first["id"], *second["id"]]
        assert len(set(ids)) == 8 and set(ids) <= set(records["id"])  # a pass repeats no row

    # a shard of at most keep_rows rows is read once and reshuffled in memory; a larger one is read
    # every pass. Either way no pass repeats a row, and the rows a pass leaves out change
    class Counted:  # the real shard, counting its passes
        def __init__(self, shard):
            self.shard, self.reads = shard, 0

        def iter_batches(self, **kwargs):
            self.reads += 1
            return self.shard.iter_batches(**kwargs)

    for keep_rows, reads in ((10, 1), (9, 6)):
        shard = Counted(ds.iterator())
        stream = batch_stream(shard, 4, seed=1, rank=0, start=0, keep_rows=keep_rows)
        passes = [[*next(stream)["id"], *next(stream)["id"]] for _ in range(6)]
        assert shard.reads == reads, keep_rows
        assert all(len(set(p)) == 8 for p in passes)
        assert {i for p in passes for i in p} == set(records["id"])  # none left out of every pass
        assert len({tuple(p) for p in passes}) == 6  # a new order each pass

    # the export's query prompts come from these counts, over every block of the dataset; a row without
    # an instruction still counts towards the rows
    mixed = records.assign(instruction=["a"] * 6 + ["b"] * 2 + [None, "a, again"])
    counts = check_dataset(ray.data.from_pandas(mixed).repartition(3), 4, 2, 4)
    assert counts == {"a": 6, "b": 2, None: 1, "a, again": 1}
