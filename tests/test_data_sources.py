"""Every data set format through one API, and the errors bad layouts give."""

import shutil

import numpy as np
import pytest

from qvl_core.data import DataConfig, DataError, DatasetConfig, decode_image, load_data, read_dataset
from qvl_core.data import fixtures
from qvl_core.data.digits import ensure_digits
from qvl_core.schema import SchemaError, from_dict


def _cfg(fmt, path, **kw):
    return DatasetConfig(name="set", format=fmt, path=str(path), **kw)


def _check_split(split, classes, n):
    assert split.classes == tuple(classes)
    assert len(split) == n
    labels = [split.read(i)[1] for i in range(len(split))]
    assert sorted(set(labels)) == list(range(len(classes)))
    if split.labels is not None:
        assert labels == split.labels.tolist()
    for i in range(len(split)):
        assert decode_image(split.read(i)[0]).mode == "RGB"


def test_food101_layout(tmp_path):
    fixtures.write_food101(tmp_path, ["apple_pie", "bibimbap", "churros"], train_per_class=4, test_per_class=2)
    train, test = read_dataset(_cfg("food101", tmp_path))
    _check_split(train, ["apple_pie", "bibimbap", "churros"], 12)
    _check_split(test, ["apple_pie", "bibimbap", "churros"], 6)
    assert train.where(0).endswith("images/apple_pie/0.jpg")


def test_imagefolder_layout_skips_non_images(tmp_path, caplog):
    fixtures.write_imagefolder(tmp_path, ["cat", "dog", "fox"], per_class=3, formats=("JPEG", "PNG", "BMP"))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    train, test = read_dataset(_cfg("imagefolder", tmp_path))
    _check_split(train, ["cat", "dog", "fox"], 9)
    _check_split(test, ["cat", "dog", "fox"], 9)
    assert "skipped 1 files without an image extension" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("parquet", [False, True])
def test_hf_datasets_on_disk_and_parquet(tmp_path, parquet, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    fixtures.write_hf(tmp_path / "ds", ["red", "green", "blue"], per_class=2, parquet=parquet,
                      image_column="img", label_column="fine_label")
    cfg = _cfg("hf", tmp_path / "ds", image_column="img", label_column="fine_label")
    train, test = read_dataset(cfg)
    _check_split(train, ["red", "green", "blue"], 6)  # ClassLabel names, in their order
    _check_split(test, ["red", "green", "blue"], 6)
    with pytest.raises(DataError, match=r"no column 'image' \(columns: img, fine_label\)"):
        read_dataset(_cfg("hf", tmp_path / "ds"))


def test_tfds_array_record_without_tensorflow(tmp_path):
    import sys

    root = fixtures.write_tfds(tmp_path, ["circle", "square"], per_class=3)
    train, test = read_dataset(_cfg("tfds", root))
    _check_split(train, ["circle", "square"], 6)
    _check_split(test, ["circle", "square"], 6)
    assert "tensorflow" not in sys.modules
    with pytest.raises(DataError, match="no dataset_info.json.*did you mean"):
        read_dataset(_cfg("tfds", tmp_path))


def test_digits_are_written_once_with_a_fixed_split(tmp_path):
    root = ensure_digits(tmp_path / "digits")
    stamp = (root / "meta" / "train.txt").stat().st_mtime_ns
    train, test = read_dataset(_cfg("digits", root))
    assert (len(train), len(test)) == (1442, 355) and train.classes == tuple("0123456789")
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    np.testing.assert_array_equal(np.bincount(test.labels), per_class // 5)  # every fifth image of each class
    assert ensure_digits(root) == root and (root / "meta" / "train.txt").stat().st_mtime_ns == stamp
    image = decode_image(train.read(0)[0])
    assert image.size == (64, 64)


def test_missing_directory(tmp_path):
    for fmt in ("food101", "imagefolder", "hf", "tfds"):
        with pytest.raises(DataError, match=f"directory {tmp_path / 'nope'} does not exist"):
            read_dataset(_cfg(fmt, tmp_path / "nope"))


def test_food101_meta_errors(tmp_path):
    fixtures.write_food101(tmp_path, ["a", "b"], train_per_class=2, test_per_class=1)
    with pytest.raises(DataError, match="split 'val' needs .*meta/val.txt.*meta has: test.txt, train.txt"):
        read_dataset(_cfg("food101", tmp_path, eval_split="val"))
    with (tmp_path / "meta" / "train.txt").open("a") as f:
        f.write("pizza/123\n")
    with pytest.raises(DataError, match=r"train.txt:5: class 'pizza' of 'pizza/123' is not in .*classes.txt"):
        read_dataset(_cfg("food101", tmp_path))


def test_food101_empty_class_and_missing_files(tmp_path):
    fixtures.write_food101(tmp_path, ["a", "b"], train_per_class=2, test_per_class=1)
    (tmp_path / "meta" / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"1 class\(es\) have no images: c"):
        read_dataset(_cfg("food101", tmp_path))
    (tmp_path / "meta" / "classes.txt").write_text("a\nb\n")
    (tmp_path / "images" / "a" / "0.jpg").unlink()
    train, _ = read_dataset(_cfg("food101", tmp_path))
    assert [train.where(i) for i in train.missing] == [str(tmp_path / "images" / "a" / "0.jpg")]
    config = DataConfig(datasets=(_cfg("food101", tmp_path),), image_size=56)  # 1 of 4 missing > 0.1 %
    with pytest.raises(DataError, match=r"1 of 4 listed images are missing.*images/a/0.jpg"):
        load_data(config)


def test_imagefolder_errors(tmp_path):
    fixtures.write_imagefolder(tmp_path, ["cat", "dog"], per_class=2)
    with pytest.raises(DataError, match="split folder .*/val does not exist \\(found: test, train\\)"):
        read_dataset(_cfg("imagefolder", tmp_path, eval_split="val"))
    for f in (tmp_path / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="class folder .*train/dog has no images"):
        read_dataset(_cfg("imagefolder", tmp_path))
    shutil.rmtree(tmp_path / "train" / "dog")
    with pytest.raises(DataError, match="test/dog is a class the train split does not have"):
        read_dataset(_cfg("imagefolder", tmp_path))


def test_data_config_errors_name_the_key():
    good = {"name": "food101", "format": "food101", "path": "/data/food-101"}
    with pytest.raises(SchemaError, match=r"data.datasets\[0\].format: 'food' is not one of"):
        from_dict(DataConfig, {"datasets": [{**good, "format": "food"}]}, "data")
    with pytest.raises(SchemaError, match=r"unknown config key 'data.datasets\[0\].wieght' \(did you mean 'weight'\?\)"):
        from_dict(DataConfig, {"datasets": [{**good, "wieght": 2}]}, "data")
    with pytest.raises(SchemaError, match="data.image_size: 100: sides must be positive multiples of 28"):
        from_dict(DataConfig, {"datasets": [good], "image_size": 100}, "data")
    with pytest.raises(SchemaError, match="names must be unique, repeated: food101"):
        from_dict(DataConfig, {"datasets": [good, good]}, "data")
    config = from_dict(DataConfig, {"datasets": [good], "image_size": [448, 224]}, "data")
    assert config.image_hw == (448, 224) and config.grid_thw == (1, 32, 16)
