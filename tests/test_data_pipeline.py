"""Mixture order, label maps, train/eval sources, bad images, and the grain / torch loaders."""

import logging

import numpy as np
import pytest

from qvl_core.data import (
    BadRecords,
    DataConfig,
    DataError,
    DatasetConfig,
    EvalSource,
    LabelMap,
    MixtureOrder,
    TrainSource,
    load_data,
)
from qvl_core.data import fixtures
from qvl_core.data.config import AugmentConfig
from qvl_core.data.mixture import shares


def test_each_epoch_visits_every_record_once_at_proportional_weights():
    order = MixtureOrder([7, 5], [7, 5], seed=3)
    for epoch in range(3):
        datasets, records = order.epoch(epoch)
        for d, n in enumerate([7, 5]):
            assert sorted(records[datasets == d].tolist()) == list(range(n))
    assert [order[p] for p in range(12)] == list(zip(*[a.tolist() for a in order.epoch(0)]))
    assert not np.array_equal(order.epoch(0)[1], order.epoch(1)[1])  # reshuffled each epoch
    assert not np.array_equal(order.epoch(0)[1], MixtureOrder([7, 5], [7, 5], seed=4).epoch(0)[1])


def test_weights_oversample_without_repeating_before_a_full_pass():
    order = MixtureOrder([100, 4], [1, 1], seed=0)  # the small set gets half of every epoch
    assert order.counts.tolist() == [52, 52]
    stream = [r for p in range(3 * order.epoch_length) for d, r in [order[p]] if d == 1]
    for k in range(0, len(stream) - 3, 4):
        assert sorted(stream[k:k + 4]) == [0, 1, 2, 3]
    assert shares(10, [1, 1, 1]).tolist() == [4, 3, 3] and shares(7, [0.5, 0.25, 0.25]).sum() == 7


def test_label_spaces_shared_and_separate(tmp_path):
    shared = LabelMap.build("shared", {"food_a": ["pizza", "sushi"], "food_b": ["ramen", "pizza"]})
    assert shared.names == ("pizza", "sushi", "ramen")
    assert shared.head_index("food_b").tolist() == [2, 0] and shared.owners[0] == ("food_a", "food_b")
    separate = LabelMap.build("separate", {"food_a": ["pizza", "sushi"], "food_b": ["ramen", "pizza"]})
    assert separate.names == ("food_a/pizza", "food_a/sushi", "food_b/ramen", "food_b/pizza")
    assert separate.head_index("food_b").tolist() == [2, 3]
    separate.save(tmp_path / "labels.json")
    assert LabelMap.load(tmp_path / "labels.json") == separate
    with pytest.raises(DataError, match=r"checkpoint x: label map does not match this run's data \(4 labels there, 3"):
        shared.check_compatible(separate, "checkpoint x")


@pytest.fixture
def two_sets(tmp_path):
    fixtures.write_food101(tmp_path / "a", ["pizza", "sushi"], train_per_class=3, test_per_class=2)
    fixtures.write_imagefolder(tmp_path / "b", ["ramen", "pizza"], per_class=2)
    return DataConfig(
        datasets=(DatasetConfig(name="a", format="food101", path=str(tmp_path / "a")),
                  DatasetConfig(name="b", format="imagefolder", path=str(tmp_path / "b"), weight=2.0)),
        image_size=(56, 84),
    )


def test_train_source_examples_are_deterministic_and_labelled_by_data_set(two_sets):
    data = load_data(two_sets)
    assert data.label_map.names == ("pizza", "sushi", "ramen")
    source = TrainSource(data, seed=0, num_records=40)
    assert source.order.counts.tolist() == [3, 7]  # 10 records per epoch, weights 1:2
    again = TrainSource(load_data(two_sets), seed=0, num_records=40)
    for p in range(len(source)):
        ex = source[p]
        assert ex["patches"].shape == (4 * 6, 588) and ex["patches"].dtype == np.uint8 and ex["valid"]
        np.testing.assert_array_equal(ex["patches"], again[p]["patches"])
        d, r = source.order[p]
        split = source.splits[d]
        assert ex["dataset"] == d and ex["record"] == r
        assert data.label_map.names[ex["label"]] == split.classes[split.read(r)[1]]
    # the same record is cropped differently at its next visit
    first = {(int(source[p]["dataset"]), int(source[p]["record"])): p for p in range(10)}
    (d, r), p0 = next(iter(first.items()))
    p1 = next(p for p in range(10, 40) if source.order[p] == (d, r))
    assert not np.array_equal(source[p0]["patches"], source[p1]["patches"])
    with pytest.raises(IndexError):
        source[40]


def test_eval_source_pads_with_invalid_examples(two_sets):
    data = load_data(two_sets)
    source = EvalSource(data, "a", pad_to=3)
    assert len(data.eval["a"]) == 4 and len(source) == 6
    assert [bool(source[i]["valid"]) for i in range(6)] == [True] * 4 + [False] * 2
    assert source[5]["record"] == -1 and not source[5]["patches"].any()
    resized = source[0]["patches"]
    assert np.array_equal(resized, source[0]["patches"])  # no randomness at eval


def test_unreadable_images_are_skipped_logged_and_counted(tmp_path, caplog):
    bad = fixtures.write_food101(tmp_path, ["a", "b"], train_per_class=10, test_per_class=1, corrupt=2)
    tolerant = DataConfig(datasets=(DatasetConfig(name="f", format="food101", path=str(tmp_path)),),
                          image_size=56, max_bad_fraction=0.2)
    data = load_data(tolerant)
    source = TrainSource(data, seed=0)
    examples = [source[p] for p in range(len(source))]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    assert (~batch["valid"]).sum() == 2
    tracker = BadRecords(data)
    with caplog.at_level(logging.WARNING):
        assert tracker.update(batch) == 2
        tracker.update(batch)  # seen again next epoch: not logged twice
    for path in bad:
        assert len([r for r in caplog.records if path in r.getMessage()]) == 1
    assert tracker.counts()["train/f"] == 2
    strict = BadRecords(load_data(DataConfig(datasets=tolerant.datasets, image_size=56, max_bad_fraction=0.001)))
    with pytest.raises(DataError, match=r"'f' \(train\): 1 of 20 images are unreadable, more than data.max_bad_fraction=0.001"):
        strict.update(batch)


def _all_batches(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture
def digits_like(tmp_path):
    fixtures.write_food101(tmp_path, ["a", "b", "c"], train_per_class=8, test_per_class=1)
    config = DataConfig(datasets=(DatasetConfig(name="f", format="food101", path=str(tmp_path)),), image_size=28,
                        augment=AugmentConfig(scale=(0.5, 1.0)))
    return TrainSource(load_data(config), seed=1, num_records=96)


def test_grain_loader_is_the_source_order_and_resumes_exactly(digits_like):
    from qvl_jax.input_pipeline import make_loader

    source = digits_like
    it = iter(make_loader(source, batch_size=8))
    head = _all_batches(it, 3)
    for k, batch in enumerate(head):
        assert batch["record"].tolist() == [source.order[p][1] for p in range(8 * k, 8 * k + 8)]
    state = it.get_state()
    tail = _all_batches(it, 4)
    resumed = iter(make_loader(source, batch_size=8))
    resumed.set_state(state)
    for a, b in zip(tail, _all_batches(resumed, 4)):
        _same(a, b)
    # two processes of 4 each: their k-th batches together are the k-th global batch of 8
    parts = [_all_batches(iter(make_loader(source, batch_size=4, process_index=p, process_count=2)), 3) for p in (0, 1)]
    for k in range(3):
        merged = sorted(parts[0][k]["record"].tolist() + parts[1][k]["record"].tolist())
        assert merged == sorted(head[k]["record"].tolist())


def test_grain_workers_give_the_same_batches_and_state(digits_like):
    from qvl_jax.input_pipeline import make_loader

    plain = _all_batches(iter(make_loader(digits_like, batch_size=8)), 6)
    it = iter(make_loader(digits_like, batch_size=8, num_workers=2))
    first = _all_batches(it, 2)
    state = it.get_state()
    rest = _all_batches(it, 4)
    for a, b in zip(plain, first + rest):
        _same(a, b)
    resumed = iter(make_loader(digits_like, batch_size=8, num_workers=2))
    resumed.set_state(state)
    for a, b in zip(rest, _all_batches(resumed, 4)):
        _same(a, b)


def test_torch_loader_reads_the_same_batches_as_grain(digits_like):
    from qvl_jax.input_pipeline import make_loader as grain_loader
    from qvl_torch.data import make_loader as torch_loader

    for rank in (0, 1):
        ours = _all_batches(iter(grain_loader(digits_like, batch_size=4, process_index=rank, process_count=2)), 6)
        theirs = list(torch_loader(digits_like, batch_size=4, rank=rank, world_size=2))
        assert len(theirs) == 12
        for a, b in zip(ours, theirs):
            _same(a, {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in b.items()})
        resumed = list(torch_loader(digits_like, batch_size=4, rank=rank, world_size=2, start_batch=4))
        _same(ours[4], {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in resumed[0].items()})
