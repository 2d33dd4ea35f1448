"""The region-feature store: per-image detector features and normalised boxes in memory maps.

Layout of a store folder:
  features.npy  float16/float32 [num_images, num_boxes, feat_dim]
  boxes.npy     float32 [num_images, num_boxes, 4]  (x1, y1, x2, y2 divided by image width/height)
  img_ids.json  list of image ids, row i of both arrays belongs to img_ids[i]
  meta.json     {"num_boxes", "feat_dim", "dtype", "num_images", "fingerprint"}

Arrays are opened with mmap_mode='r': opening costs the same for 100 or 100,000 images, pages are
read on demand, and DataLoader workers forked from the parent share the mapping instead of copying.

The fingerprint is written with the store: sha256 of both array files, and a sha256 of a fixed sample of
rows (first, last and 64 evenly spaced ones) with the image ids, which is checked every time the store is
opened (milliseconds for any size), so arrays replaced after the store was written are refused.
Image ids of the six-field bottom-up-attention TSV have no COCO split (COCO_000000000042); a lookup of
COCO_val2014_000000000042 finds them too.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import InputError
from ..core.files import file_sha256, read_json, write_json

log = logging.getLogger("lxmert")
_SPLIT_NAME = re.compile(r"^COCO_(?:train2014|val2014|test2015)_(\d{12})$")
SAMPLE_ROWS = 64
_UNCHECKED: set[str] = set()


def coco_id_name(image_id: int) -> str:
    """The store name of a COCO image known by its integer id only: COCO_000000000042."""
    return f"COCO_{int(image_id):012d}"


def _split_free(img_id: str) -> Optional[str]:
    match = _SPLIT_NAME.match(img_id)
    return f"COCO_{match.group(1)}" if match else None


def sample_rows(n: int) -> list[int]:
    return sorted({0, max(n - 1, 0), *np.linspace(0, max(n - 1, 0), SAMPLE_ROWS).astype(int).tolist()}) if n else []


def sample_fingerprint(features: np.ndarray, boxes: np.ndarray, ids: list[str]) -> str:
    digest = hashlib.sha256()
    for r in sample_rows(len(ids)):
        digest.update(np.ascontiguousarray(features[r]).tobytes())
        digest.update(np.ascontiguousarray(boxes[r]).tobytes())
        digest.update(ids[r].encode())
    return digest.hexdigest()


def fingerprint(folder: Path, features: np.ndarray, boxes: np.ndarray, ids: list[str]) -> dict:
    return {"sample_sha256": sample_fingerprint(features, boxes, ids), "sample_rows": SAMPLE_ROWS,
            "features_sha256": file_sha256(folder / "features.npy"), "boxes_sha256": file_sha256(folder / "boxes.npy")}


def _positive_int(meta: dict, key: str, path: Path) -> int:
    value = meta.get(key)
    digits = str(value).isascii() and str(value).isdigit()  # not '²', which isdigit() takes and int() does not
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not digits or int(value) <= 0:
        raise InputError(f"{path}: field '{key}' = {value!r:.40} must be a positive integer")
    return int(value)


class FeatureStore:
    """Read-only access to a prepared store; rows are looked up by image id. Every file is checked when it
    opens; `check_fingerprint=False` skips only the fingerprint (to record a new one)."""

    def __init__(self, folder: str | Path, check_fingerprint: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"feature store {self.folder}: not a folder (python -m lxmert prepare features "
                             f"writes one)")
        meta_path = self.folder / "meta.json"
        meta = read_json(meta_path, "feature store metadata")
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object")
        for key in ("num_boxes", "feat_dim", "num_images"):
            if key not in meta:
                raise InputError(f"{meta_path}: missing field '{key}'")
        self.num_boxes, self.feat_dim = _positive_int(meta, "num_boxes", meta_path), _positive_int(meta, "feat_dim", meta_path)
        num_images = _positive_int(meta, "num_images", meta_path)
        ids = read_json(self.folder / "img_ids.json", "feature store image ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise InputError(f"{self.folder / 'img_ids.json'}: expected a list of distinct image id strings")
        if len(ids) != num_images:
            raise InputError(f"{meta_path}: num_images is {num_images}, img_ids.json lists {len(ids)} images")
        self.ids = ids
        self.index = {img_id: i for i, img_id in enumerate(ids)}
        self._features = self._open("features.npy", (len(ids), self.num_boxes, self.feat_dim))
        self._boxes = self._open("boxes.npy", (len(ids), self.num_boxes, 4))
        self.meta = meta
        if check_fingerprint:
            self._check_fingerprint(meta, meta_path)

    def _check_fingerprint(self, meta: dict, meta_path: Path) -> None:
        recorded = meta.get("fingerprint")
        if not isinstance(recorded, dict) or "sample_sha256" not in recorded:
            if str(self.folder) in _UNCHECKED:
                return
            _UNCHECKED.add(str(self.folder))
            log.warning("%s has no fingerprint (written by an older version): its arrays cannot be checked; "
                        "add one with python -m lxmert prepare fingerprint %s", meta_path, self.folder)
            return
        if sample_fingerprint(self._features, self._boxes, self.ids) != recorded["sample_sha256"]:
            raise InputError(f"{self.folder}: features.npy / boxes.npy differ from the fingerprint written with the "
                             f"store (changed since); prepare the store again, or record the change with "
                             f"python -m lxmert prepare fingerprint {self.folder}")

    def _open(self, name: str, shape: tuple) -> np.ndarray:
        path = self.folder / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"feature store file not found: {path}") from None
        except (ValueError, EOFError) as e:
            raise InputError(f"{path}: not a valid .npy array ({e})") from None
        except OSError as e:
            raise InputError(f"feature store file {path} cannot be read ({e.strerror or type(e).__name__})") from None
        if tuple(arr.shape) != shape:
            raise InputError(f"{path}: shape {tuple(arr.shape)} differs from {shape} given by meta.json/img_ids.json")
        return arr

    def __len__(self) -> int:
        return len(self.index)

    def _find(self, img_id: str) -> Optional[int]:
        row = self.index.get(img_id)
        if row is None and (free := _split_free(img_id)) is not None:
            row = self.index.get(free)
        return row

    def __contains__(self, img_id: str) -> bool:
        return self._find(img_id) is not None

    def row(self, img_id: str) -> int:
        row = self._find(img_id)
        if row is None:
            raise InputError(f"image '{img_id}' is not in the feature store {self.folder}")
        return row

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


def _reserved_memmap(path: Path, dtype: str, shape: tuple) -> np.memmap:
    """An .npy file of `shape` whose data blocks are allocated on disk before anything is written: a full
    disk is one OSError(ENOSPC) here, not a Bus error when a page of a sparse memory map is first touched."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
        offset = fh.tell()
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR)
    try:
        if nbytes:
            os.posix_fallocate(fd, offset, nbytes)
    finally:
        os.close(fd)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


class StoreWriter:
    """Write a store row by row into preallocated memory maps (nothing held in RAM)."""

    def __init__(self, folder: str | Path, num_images: int, num_boxes: int, feat_dim: int,
                 dtype: str = "float32"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape = (num_images, num_boxes, feat_dim)
        self.dtype = dtype
        self.features = _reserved_memmap(self.folder / "features.npy", dtype, self.shape)
        self.boxes = _reserved_memmap(self.folder / "boxes.npy", "float32", (num_images, num_boxes, 4))
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
        """Flush arrays, then write ids and meta (with the fingerprint) last: a store without meta.json is
        unfinished."""
        if len(self.ids) != self.shape[0]:
            raise InputError(f"{self.folder}: wrote {len(self.ids)} images, expected {self.shape[0]}")
        self.features.flush()
        self.boxes.flush()
        print_ = fingerprint(self.folder, self.features, self.boxes, self.ids)
        del self.features, self.boxes
        write_json(self.folder / "img_ids.json", self.ids, indent=None)
        write_json(self.folder / "meta.json", {"num_images": self.shape[0], "num_boxes": self.shape[1],
                                               "feat_dim": self.shape[2], "dtype": self.dtype,
                                               "fingerprint": print_})


def refresh_fingerprint(folder: str | Path) -> dict:
    """Recompute and record a store's fingerprint (stores written before fingerprints, or changed on purpose).
    The store is checked as when it opens (every file there, shapes matching meta.json), all but the old
    fingerprint; a missing or malformed file is one error naming it and meta.json is left as it was."""
    store = FeatureStore(folder, check_fingerprint=False)
    meta = dict(store.meta, fingerprint=fingerprint(store.folder, store._features, store._boxes, store.ids))
    write_json(store.folder / "meta.json", meta)
    return meta["fingerprint"]
