"""The run's label map: head index -> (class name, data sets using it).

`shared`: a class name that occurs in several data sets maps to one head index
(two food sets share "pizza"). `separate`: each data set gets its own index range,
named "<dataset>/<class>". The map is written beside the run config and inside
every checkpoint; evaluation and prediction read it back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from .sources import DataError


@dataclasses.dataclass(frozen=True)
class LabelMap:
    space: Literal["shared", "separate"]
    names: tuple[str, ...]  # head index -> class name ("<dataset>/<class>" when separate)
    owners: tuple[tuple[str, ...], ...]  # head index -> data sets that have the class
    members: dict[str, tuple[int, ...]]  # data set -> head index of each of its classes, in its order

    @classmethod
    def build(cls, space: str, classes: dict[str, Sequence[str]]) -> "LabelMap":
        """`classes`: data set name -> its class names in its own order (dict order is the config's)."""
        names: list[str] = []
        owners: list[list[str]] = []
        members: dict[str, tuple[int, ...]] = {}
        index: dict[str, int] = {}
        for dataset, its_classes in classes.items():
            rows = []
            for name in its_classes:
                key = name if space == "shared" else f"{dataset}/{name}"
                if key not in index:
                    index[key] = len(names)
                    names.append(key)
                    owners.append([])
                owners[index[key]].append(dataset)
                rows.append(index[key])
            members[dataset] = tuple(rows)
        return cls(space, tuple(names), tuple(tuple(o) for o in owners), members)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def head_index(self, dataset: str) -> np.ndarray:
        """int32 [classes of `dataset`]: its class index -> head index."""
        return np.asarray(self.members[dataset], np.int32)

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def to_json(self) -> dict:
        return {
            "label_space": self.space,
            "num_labels": self.num_labels,
            "labels": [{"index": i, "name": n, "datasets": list(o)} for i, (n, o) in enumerate(zip(self.names, self.owners))],
            "datasets": {d: list(m) for d, m in self.members.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "LabelMap":
        rows = sorted(data["labels"], key=lambda r: r["index"])
        return cls(
            data["label_space"],
            tuple(r["name"] for r in rows),
            tuple(tuple(r["datasets"]) for r in rows),
            {d: tuple(m) for d, m in data["datasets"].items()},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"label map {path} does not exist")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"label map {path} is not a qvl label map ({e})") from e

    def check_compatible(self, other: "LabelMap", where: str) -> None:
        """Raises unless `other` (e.g. a checkpoint's) gives every class the same head index."""
        if self.names != other.names:
            if self.num_labels != other.num_labels:
                detail = f"{other.num_labels} labels there, {self.num_labels} in this run's data"
            else:
                i = next(i for i, (a, b) in enumerate(zip(self.names, other.names)) if a != b)
                detail = f"head index {i} is {other.names[i]!r} there, {self.names[i]!r} here"
            raise DataError(f"{where}: label map does not match this run's data ({detail})")
