"""The region-feature store: per-image detector features and normalised boxes in memory maps.

Layout of a store folder:
  features.npy  float16/float32 [num_images, num_boxes, feat_dim]
  boxes.npy     float32 [num_images, num_boxes, 4]  (x1, y1, x2, y2 divided by image width/height)
  img_ids.json  list of image ids, row i of both arrays belongs to img_ids[i]
  meta.json     {"num_boxes", "feat_dim", "dtype", "num_images"}

Arrays are opened with mmap_mode='r': opening costs the same for 100 or 100,000 images, pages are
read on demand, and DataLoader workers forked from the parent share the mapping instead of copying.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import InputError, read_json, write_json


class FeatureStore:
    """Read-only access to a prepared store; rows are looked up by image id."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = read_json(self.folder / "meta.json", "feature store metadata")
        for key in ("num_boxes", "feat_dim", "num_images"):
            if key not in meta:
                raise InputError(f"{self.folder / 'meta.json'}: missing field '{key}'")
        self.num_boxes, self.feat_dim = int(meta["num_boxes"]), int(meta["feat_dim"])
        ids = read_json(self.folder / "img_ids.json", "feature store image ids")
        self.index = {img_id: i for i, img_id in enumerate(ids)}
        self._features = self._open("features.npy", (len(ids), self.num_boxes, self.feat_dim))
        self._boxes = self._open("boxes.npy", (len(ids), self.num_boxes, 4))

    def _open(self, name: str, shape: tuple) -> np.ndarray:
        path = self.folder / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"feature store file not found: {path}") from None
        except ValueError as e:
            raise InputError(f"{path}: not a valid .npy array ({e})") from None
        if tuple(arr.shape) != shape:
            raise InputError(f"{path}: shape {tuple(arr.shape)} differs from {shape} given by meta.json/img_ids.json")
        return arr

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self.index

    def row(self, img_id: str) -> int:
        try:
            return self.index[img_id]
        except KeyError:
            raise InputError(f"image '{img_id}' is not in the feature store {self.folder}") from None

    def get(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and boxes of one row."""
        return np.asarray(self._features[row], dtype=np.float32), np.asarray(self._boxes[row])

    def check_boxes(self, sample: int = 2000) -> None:
        """Refuse boxes outside [0, 1]: they were not normalised by image size."""
        n = min(sample, len(self))
        boxes = np.asarray(self._boxes[:n])
        if n and (boxes.min() < -1e-3 or boxes.max() > 1 + 1e-3):
            raise InputError(f"{self.folder / 'boxes.npy'}: boxes are not normalised to [0, 1] "
                             f"(range {boxes.min():.3g}..{boxes.max():.3g}); divide x by img_w and y by img_h")


class StoreWriter:
    """Write a store row by row into preallocated memory maps (nothing held in RAM)."""

    def __init__(self, folder: str | Path, num_images: int, num_boxes: int, feat_dim: int,
                 dtype: str = "float32"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape = (num_images, num_boxes, feat_dim)
        self.dtype = dtype
        self.features = np.lib.format.open_memmap(self.folder / "features.npy", mode="w+",
                                                  dtype=dtype, shape=self.shape)
        self.boxes = np.lib.format.open_memmap(self.folder / "boxes.npy", mode="w+", dtype=np.float32,
                                               shape=(num_images, num_boxes, 4))
        self.ids: list[str] = []

    def add(self, img_id: str, features: np.ndarray, boxes: np.ndarray) -> None:
        i = len(self.ids)
        if features.shape != self.shape[1:]:
            raise InputError(f"image '{img_id}': features have shape {features.shape}, expected {self.shape[1:]}")
        if boxes.shape != (self.shape[1], 4):
            raise InputError(f"image '{img_id}': boxes have shape {boxes.shape}, expected {(self.shape[1], 4)}")
        self.features[i] = features
        self.boxes[i] = boxes
        self.ids.append(img_id)

    def close(self) -> None:
        """Flush arrays, then write ids and meta last: a store without meta.json is unfinished."""
        if len(self.ids) != self.shape[0]:
            raise InputError(f"{self.folder}: wrote {len(self.ids)} images, expected {self.shape[0]}")
        self.features.flush()
        self.boxes.flush()
        del self.features, self.boxes
        write_json(self.folder / "img_ids.json", self.ids, indent=None)
        write_json(self.folder / "meta.json", {"num_images": self.shape[0], "num_boxes": self.shape[1],
                                               "feat_dim": self.shape[2], "dtype": self.dtype})
