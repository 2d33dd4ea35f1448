"""The data pipeline alone: memory-mapped feature store vs the original TSV + base64 loading.

    python -m bench.data [--images 5000] [--small-images 500] [--tsv-images 500] [--batch-size 32]
                         [--batches 100] [--threads T] [--dir /tmp] [--no-append]

Generates a feature store of random features (--images x 36 x 2048 float32, ~1.5 GB for 5,000 images)
and a smaller one in a temporary folder (removed afterwards), plus a TSV in the original LXMERT format
(img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features; the
arrays base64-encoded) with --tsv-images rows.

Throughput, in samples (questions) per second, with questions drawn at random over the images in
shuffled batches (lxmert.data.datasets.BatchSampler), three questions per image:
  - the project's path: lxmert.data.datasets.VQADataset builds a whole batch from a list of indices (one sorted
    memory-map gather; this is the collate), directly and through lxmert.data.datasets.loader (DataLoader) with
    0 and 2 workers; "cold" = the store's files evicted from the page cache first
    (posix_fadvise DONTNEED), "warm" = the store read once before (pages cached but not yet mapped into
    the fresh memory map: one minor page fault per 4 kB on first touch), "same batches again" = the
    timed batches drawn once before from the same dataset (pages cached and mapped);
  - the original path: the whole TSV parsed into a list of dicts at start-up (csv + base64 + numpy), then
    per-question items (box normalisation) and torch's default collate.
Memory: anonymous and file-backed RSS of this process after opening each store and after reading the
same number of batches from it (a memory map's pages are file-backed, shared and reclaimable; the
anonymous part is what a store costs the process), against the growth of the TSV loader.
"""
from __future__ import annotations

import argparse
import base64
import csv
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import append  # noqa: E402
from lxmert.data.datasets import BatchSampler, Split, VQADataset, loader  # noqa: E402
from lxmert.data.features import FeatureStore, StoreWriter  # noqa: E402

ANSWERS = 3129
TOKENS = 20
QUESTIONS_PER_IMAGE = 3
TSV_COLUMNS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
               "boxes", "features")


def rss_parts() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process in GiB."""
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                found[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return found.get("RssAnon", 0.0), found.get("RssFile", 0.0)


def random_boxes(rng: np.random.Generator, n: int, regions: int) -> np.ndarray:
    """Normalised x1, y1, x2, y2 in [0, 1]."""
    x1y1 = rng.random((n, regions, 2), dtype=np.float32) * 0.5
    wh = rng.random((n, regions, 2), dtype=np.float32) * 0.5
    return np.concatenate([x1y1, x1y1 + wh], -1)


def write_store(folder: Path, images: int, regions: int, feat_dim: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    writer = StoreWriter(folder, images, regions, feat_dim)
    boxes = random_boxes(rng, images, regions)
    for i in range(images):
        writer.add(f"img{i:07d}", rng.random((regions, feat_dim), dtype=np.float32), boxes[i])
    writer.close()
    return time.perf_counter() - start


def questions_split(images: int, seed: int) -> Split:
    """Random questions shaped like lxmert.data.datasets.load_split's output (rows resolved, labels in CSR form)."""
    rng = np.random.default_rng(seed)
    n = images * QUESTIONS_PER_IMAGE
    lengths = rng.integers(6, TOKENS + 1, n)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1000, 30522, (n, TOKENS)) * mask
    per = rng.integers(1, 5, n)
    ptr = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
    types = [f"type{k}" for k in rng.integers(0, 10, n)]
    return Split(name="bench", question_ids=np.arange(n), question_types=types, answer_types=["other"] * n,
                 sentences=[""] * n, input_ids=ids, attention_mask=mask, rows=rng.integers(0, images, n),
                 label_ptr=ptr, label_idx=rng.integers(0, ANSWERS, int(ptr[-1])),
                 label_score=rng.choice(np.array([0.3, 0.6, 0.9, 1.0], np.float32), int(ptr[-1])),
                 has_labels=True, out_of_vocab=0)


def evict(folder: Path) -> None:
    """Drop a store's files from the page cache (works for clean pages that no process has mapped)."""
    os.sync()
    for name in ("features.npy", "boxes.npy"):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(folder: Path) -> None:
    for name in ("features.npy", "boxes.npy"):
        with open(folder / name, "rb") as fh:
            while fh.read(64 << 20):
                pass


def open_dataset(folder: Path, images: int) -> VQADataset:
    store = FeatureStore(folder)
    split = questions_split(images, seed=7)
    qtypes = {t: i for i, t in enumerate(sorted(set(split.question_types)))}
    return VQADataset(split, store, ANSWERS, qtypes)


def time_batches(batches, limit: int) -> tuple[float, float, int]:
    """Draw `limit` batches: (seconds to the first batch, counting iter(); seconds for the rest; samples
    in the rest)."""
    start = time.perf_counter()
    first, samples = 0.0, 0
    for k, batch in enumerate(batches):
        if k == 0:
            first = time.perf_counter() - start
            start = time.perf_counter()
        else:
            samples += len(batch["index"])
        if k + 1 == limit:
            break
    return first, time.perf_counter() - start, samples


def project_path(folder: Path, images: int, batch_size: int, limit: int, mode: str, workers: int,
                 second_pass: bool = False) -> tuple[float, float]:
    """(samples/s after the first batch, ms to the first batch) of the memory-mapped store through
    VQADataset (direct, or via lxmert.data.datasets.loader)."""
    gc.collect()
    if mode == "cold":
        evict(folder)
    else:
        warm(folder)
    dataset = open_dataset(folder, images)
    sampler = BatchSampler(len(dataset), batch_size, seed=0, shuffle=True)
    if second_pass:  # the same batches once before: every page already mapped into this process
        time_batches((dataset[idx] for idx in sampler), limit)
    if workers < 0:
        source = (dataset[idx] for idx in sampler)
    else:
        source = loader(dataset, sampler, workers, pin=False)
    first, seconds, samples = time_batches(source, limit)
    del source, dataset
    return samples / seconds, 1000 * first


# -- the original LXMERT way: a TSV with base64 arrays, parsed into RAM at start-up -------------------

def write_tsv(path: Path, images: int, regions: int, feat_dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")  # noqa: E731
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i in range(images):
            h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
            boxes = random_boxes(rng, 1, regions)[0] * np.array([w, h, w, h], np.float32)
            out.writerow([f"img{i:07d}", h, w, b64(rng.integers(0, 1600, regions, dtype=np.int64)),
                          b64(rng.random(regions, dtype=np.float32)), b64(rng.integers(0, 400, regions, dtype=np.int64)),
                          b64(rng.random(regions, dtype=np.float32)), regions, b64(boxes),
                          b64(rng.random((regions, feat_dim), dtype=np.float32))])


def load_tsv_into_ram(path: Path) -> list[dict]:
    """Every row as a dict of decoded numpy arrays, all held in memory (the original start-up step)."""
    csv.field_size_limit(2**31 - 1)
    arrays = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64, "attrs_conf": np.float32,
              "boxes": np.float32, "features": np.float32}
    rows = []
    with open(path, newline="") as fh:
        for item in csv.DictReader(fh, fieldnames=TSV_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE):
            n = int(item["num_boxes"])
            record = {"img_id": item["img_id"], "img_h": int(item["img_h"]), "img_w": int(item["img_w"]),
                      "num_boxes": n}
            for key, dtype in arrays.items():
                flat = np.frombuffer(base64.b64decode(item[key]), dtype=dtype)
                record[key] = flat.reshape(n, -1) if key in ("boxes", "features") else flat
            rows.append(record)
    return rows


class OriginalStyleDataset(torch.utils.data.Dataset):
    """Per-question items from the in-RAM records, batched by torch's default collate."""

    def __init__(self, records: list[dict], split: Split):
        self.records, self.split = records, split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        sp = self.split
        rec = self.records[sp.rows[i]]
        feats = rec["features"].copy()
        boxes = rec["boxes"].copy()
        boxes[:, (0, 2)] /= rec["img_w"]
        boxes[:, (1, 3)] /= rec["img_h"]
        np.clip(boxes, 0.0, 1.0, out=boxes)
        target = np.zeros(ANSWERS, np.float32)
        a, b = sp.label_ptr[i], sp.label_ptr[i + 1]
        target[sp.label_idx[a:b]] = sp.label_score[a:b]
        return {"input_ids": torch.from_numpy(sp.input_ids[i]), "attention_mask": torch.from_numpy(sp.attention_mask[i]),
                "visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes),
                "target": torch.from_numpy(target), "index": torch.tensor(i)}


def original_path(tsv: Path, images: int, batch_size: int, limit: int) -> dict:
    gc.collect()
    start = time.perf_counter()
    records = load_tsv_into_ram(tsv)
    load_s = time.perf_counter() - start
    held = sum(v.nbytes for r in records for v in r.values() if isinstance(v, np.ndarray)) / 2**30
    dataset = OriginalStyleDataset(records, questions_split(images, seed=7))
    batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                          generator=torch.Generator().manual_seed(0))
    first, seconds, samples = time_batches(batches, limit)
    out = {"load_s": load_s, "images_s": images / load_s, "held_gib": held, "samples_s": samples / seconds,
           "first_ms": 1000 * first}
    del records, dataset, batches
    return out


def memory_rows(folders: list[tuple[Path, int]], batch_size: int, limit: int) -> list[list]:
    rows = []
    for folder, images in folders:
        gc.collect()
        evict(folder)
        anon0, file0 = rss_parts()
        start = time.perf_counter()
        dataset = open_dataset(folder, images)
        open_ms = 1000 * (time.perf_counter() - start)
        anon1, file1 = rss_parts()
        sampler = BatchSampler(len(dataset), batch_size, seed=0, shuffle=True)
        time_batches((dataset[idx] for idx in sampler), limit)
        gc.collect()
        anon2, file2 = rss_parts()
        size_gib = sum((folder / n).stat().st_size for n in ("features.npy", "boxes.npy")) / 2**30
        rows.append([f"{images:,} images", f"{size_gib:.2f}", f"{open_ms:.0f}", f"{anon1 - anon0:+.3f}",
                     f"{file1 - file0:+.3f}", limit, f"{anon2 - anon0:+.3f}", f"{file2 - file0:+.3f}"])
        del dataset
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images of the large store (default 5000)")
    parser.add_argument("--small-images", type=int, default=500, help="images of the small store (default 500)")
    parser.add_argument("--tsv-images", type=int, default=500, help="rows of the TSV (default 500)")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feat-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="batches per throughput measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--dir", default=None, help="where to write the stores and the TSV (default: the "
                                                    "system temporary folder); removed afterwards")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/PERFORMANCE.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    row_bytes = args.regions * (args.feat_dim + 4) * 4
    need = row_bytes * (args.images + args.small_images) + row_bytes * 4 / 3 * args.tsv_images
    base = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if need > 0.8 * free:
        scale = 0.8 * free / need
        args.images, args.small_images, args.tsv_images = (max(10, int(n * scale)) for n in
                                                           (args.images, args.small_images, args.tsv_images))
        print(f"only {free / 2**30:.1f} GiB free in {base}: sizes scaled down to {args.images} / "
              f"{args.small_images} / {args.tsv_images} images")
    work = Path(tempfile.mkdtemp(prefix="lxmert-bench-data-", dir=base))
    try:
        large, small, tsv = work / "large", work / "small", work / "features.tsv"
        print(f"writing stores ({need / 2**30:.2f} GB in all) to {work} ...", flush=True)
        write_s = write_store(large, args.images, args.regions, args.feat_dim, seed=1)
        write_store(small, args.small_images, args.regions, args.feat_dim, seed=2)
        write_tsv(tsv, args.tsv_images, args.regions, args.feat_dim, seed=3)
        print(f"large store written in {write_s:.1f} s", flush=True)

        bs, limit = args.batch_size, args.batches
        cmd = ("python -m bench.data " + " ".join(sys.argv[1:])).strip()
        # memory first, while the process's allocator holds nothing freed that could hide growth
        mem = memory_rows([(small, args.small_images), (large, args.images)], bs, limit)
        rows = []
        for label, mode, workers in (("VQADataset[batch] direct, cold cache", "cold", -1),
                                     ("VQADataset[batch] direct, warm cache", "warm", -1),
                                     ("VQADataset[batch] direct, same batches again", "again", -1),
                                     ("lxmert.data.datasets.loader, 0 workers, warm", "warm", 0),
                                     ("lxmert.data.datasets.loader, 2 workers, warm", "warm", 2),
                                     ("lxmert.data.datasets.loader, 2 workers, cold", "cold", 2)):
            rate, first_ms = project_path(large, args.images, bs, limit, "warm" if mode == "again" else mode,
                                          workers, second_pass=mode == "again")
            rows.append([f"memory-mapped store, {args.images:,} images", label, f"{rate:,.0f}",
                         f"{rate / 2500:.2f}", f"{first_ms:.0f} ms to the first batch"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        orig = original_path(tsv, args.tsv_images, bs, limit)
        full_load = args.images / orig["images_s"]
        rows.append([f"TSV + base64, {args.tsv_images:,} images", "parse the whole TSV into RAM (once)",
                     f"{orig['images_s']:,.0f} images/s", "-",
                     f"{orig['load_s']:.1f} s; {full_load:.0f} s for {args.images:,} images, "
                     f"{123287 / orig['images_s'] / 60:.0f} min for the 123,287 COCO images"])
        rows.append([f"TSV + base64, {args.tsv_images:,} images", "in-RAM items + default collate, 0 workers",
                     f"{orig['samples_s']:,.0f}", f"{orig['samples_s'] / 2500:.2f}",
                     f"{orig['first_ms']:.0f} ms to the first batch"])
        for r in rows[-2:]:
            print(" | ".join(str(c) for c in r), flush=True)
        load_end = os.getloadavg()[0]
        shared = max(load_start, load_end) > 0.5
        notes = (f"Command: `{cmd}`. Batches of {bs} questions, {limit} batches per row, samples/s counted after "
                 f"the first batch (whose wait, worker start-up included, is given apart); {QUESTIONS_PER_IMAGE} "
                 f"questions per image, {args.regions} regions x {args.feat_dim} float32 features "
                 f"({row_bytes / 1e3:.0f} kB per sample). 'x 2,500/s' = samples/s divided by the base-size bf16 "
                 f"GPU training target (the pipeline target is 20x). Load average (1 min) at start "
                 f"{load_start:.2f}, at end {load_end:.2f}: "
                 + ("the machine was shared with other jobs." if shared else "the machine was otherwise idle."))
        header = ["source", "path", "samples/s", "x 2,500/s", "start-up"]
        if args.no_append:
            print(notes)
        else:
            append("Data pipeline throughput", header, rows, notes)

        per_1k = orig["held_gib"] / args.tsv_images * 1000
        mem_notes = (f"Command: `{cmd}`. Growth of this process's resident memory (GiB) after opening a store "
                     f"(evicted from the page cache first) and after reading {limit} random batches of {bs} "
                     f"from it. Anonymous memory is what the store costs the process; file-backed pages are "
                     f"the memory map's, shared between DataLoader workers and reclaimable by the kernel, and "
                     f"grow with the rows touched, not with the store. For comparison the original TSV loader "
                     f"holds {orig['held_gib']:.3f} GiB of arrays in RAM for {args.tsv_images:,} images "
                     f"({per_1k:.3f} GiB per 1,000 images, i.e. {per_1k * args.images / 1000:.2f} GiB for "
                     f"{args.images:,} and {per_1k * 123.287:.0f} GiB for the 123,287 COCO images, in every "
                     f"process that loads it).")
        header = ["store", "size on disk (GiB)", "open (ms)", "anon RSS after open", "file RSS after open",
                  "batches read", "anon RSS after reading", "file RSS after reading"]
        if args.no_append:
            for r in [header] + mem:
                print(" | ".join(str(c) for c in r))
            print(mem_notes)
        else:
            append("Data pipeline memory: memory-mapped store vs store size", header, mem, mem_notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
