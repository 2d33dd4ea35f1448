"""data/download.bash against a local HTTP server: every failure is loud, nothing unverified is published.

The real script runs with its base URLs pointed at a server on 127.0.0.1 (a thread of this process, with Range
support for resuming), DATA_DIR in the test's tmp_path and DOWNLOAD_TABLE replacing its table of sizes and
checksums with one for the small files served here. Each run takes a few tens of milliseconds.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "download.bash"
DOWNLOADERS = [d for d in ("curl", "wget") if shutil.which(d)]
CP_FILES = [f"vqacp_v2_{split}_{kind}.json" for split in ("train", "test") for kind in ("questions", "annotations")]

pytestmark = pytest.mark.skipif(not DOWNLOADERS or not shutil.which("sha256sum"),
                                reason="needs curl or wget, and sha256sum")
needs_unzip = pytest.mark.skipif(not shutil.which("unzip"), reason="needs unzip")
needs_git = pytest.mark.skipif(not shutil.which("git"), reason="needs git")


class FixtureServer:
    """Serves `files` (path -> bytes) on 127.0.0.1 with single-range support. `cut[path] = n` makes the next
    response for path send its full Content-Length but only n bytes before closing the connection."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges = True  # False: ignore Range headers, as some servers do
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # http.server's naming
                path = urlsplit(self.path).path
                wanted = self.headers.get("Range")
                server.requests.append((path, wanted))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(body) - 1, 200
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "") if server.ranges else None
                if match:
                    start = int(match[1])
                    end = min(int(match[2]), len(body) - 1) if match[2] else len(body) - 1
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                chunk = body[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                cut = server.cut.pop(path, None)
                self.wfile.write(chunk if cut is None else chunk[:cut])
                self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FixtureServer()
    yield srv
    srv.close()


@pytest.fixture(params=DOWNLOADERS)
def downloader(request):
    return request.param


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_table(path: Path, rows: dict[str, bytes | None]) -> Path:
    """rows: path under the data folder -> the published bytes, or None for 'no published checksum'."""
    lines = ["# path bytes sha256 source"]
    for rel, data in rows.items():
        lines.append(f"{rel} - - none-published" if data is None else f"{rel} {len(data)} {_sha(data)} test-publisher")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cp_files() -> dict[str, bytes]:
    return {name: json.dumps({"file": name, "questions": [{"question_id": i} for i in range(40)]}).encode()
            for name in CP_FILES}


def _run(tmp_path: Path, server: FixtureServer, *parts: str, downloader: str = "", **extra: str):
    if not (tmp_path / "table.txt").exists():
        _write_table(tmp_path / "table.txt", {})
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(DATA_DIR=str(tmp_path / "data"), DOWNLOAD_TABLE=str(tmp_path / "table.txt"),
               VQA_URL=server.url("/vqa"), LXMERT_DATA_URL=server.url("/unc"), LXMERT_REPO_URL=server.url("/gh"),
               VQACP_URL=server.url("/vqacp"), DOWNLOADER=downloader or DOWNLOADERS[0], DOWNLOAD_RETRIES="0",
               HOME=str(tmp_path), NO_PROXY="*")
    env.update(extra)
    return subprocess.run(["bash", str(SCRIPT), *parts], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def _errors(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def _published(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _serve_cp(server, tmp_path, files: dict[str, bytes], published: dict[str, bytes | None] | None = None):
    """Serve files under /vqacp and write a table of what the publisher published (default: the files)."""
    for name, data in files.items():
        server.files[f"/vqacp/{name}"] = data
    published = files if published is None else published
    _write_table(tmp_path / "table.txt", {f"raw/vqa_cp_v2/{n}": d for n, d in published.items()})


WRITTEN_BY_THE_SCRIPT = ["raw/downloads.sha256", "raw/vqa_v2", "raw/vqa_cp_v2", "raw/vqa_vs", "raw/mscoco_imgfeat",
                         "vqa_v2/train.json", "lxmert/model_LXRT.pth", "lxmert/all_ans.json", "models"]


@pytest.fixture(autouse=True)
def _repository_data_untouched():
    """The script writes under DATA_DIR only, never into the repository's data/ folder."""
    def state():
        return {rel: (REPO / "data" / rel).exists() for rel in WRITTEN_BY_THE_SCRIPT}
    before = state()
    yield
    assert state() == before


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_404_fails_naming_url_and_file_and_publishes_nothing(tmp_path, server, downloader):
    files = _cp_files()
    _serve_cp(server, tmp_path, {n: d for n, d in files.items() if n != CP_FILES[0]}, published=files)
    done = _run(tmp_path, server, "vqa_cp_v2", downloader=downloader)
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1, done.stderr
    url, file = f"{server.url('/vqacp')}/{CP_FILES[0]}", tmp_path / "data/raw/vqa_cp_v2" / CP_FILES[0]
    assert url in errors[0] and str(file) in errors[0] and "404" in errors[0]
    hints = [line for line in done.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "VQACP_URL" in hints[0] and "iro.umontreal.ca/~agrawal/vqa-cp" in hints[0]
    assert _published(tmp_path / "data/raw/vqa_cp_v2") == []  # no file, no 0-byte file, no .part
    assert not (tmp_path / "data/raw/downloads.sha256").exists()


def test_truncated_file_is_caught_by_its_size(tmp_path, server):
    files = _cp_files()
    short = dict(files)
    short[CP_FILES[0]] = files[CP_FILES[0]][:-30]  # a complete HTTP response, but shorter than published
    _serve_cp(server, tmp_path, short, published=files)
    done = _run(tmp_path, server, "vqa_cp_v2")
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and "size mismatch" in errors[0], done.stderr
    assert f"{server.url('/vqacp')}/{CP_FILES[0]}" in errors[0] and CP_FILES[0] in errors[0].split(" -> ")[1]
    assert _published(tmp_path / "data/raw/vqa_cp_v2") == []


def test_wrong_checksum_is_caught(tmp_path, server):
    files = _cp_files()
    wrong = dict(files)
    wrong[CP_FILES[1]] = files[CP_FILES[1]].replace(b'"question_id": 7', b'"question_id": 8')
    assert len(wrong[CP_FILES[1]]) == len(files[CP_FILES[1]])
    _serve_cp(server, tmp_path, wrong, published=files)
    done = _run(tmp_path, server, "vqa_cp_v2")
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and "sha256 mismatch" in errors[0] and _sha(files[CP_FILES[1]]) in errors[0]
    assert f"{server.url('/vqacp')}/{CP_FILES[1]}" in errors[0]
    assert _published(tmp_path / "data/raw/vqa_cp_v2") == [CP_FILES[0]]  # the one before it, verified


def test_interrupted_download_resumes_to_the_right_file(tmp_path, server, downloader):
    files = _cp_files()
    _serve_cp(server, tmp_path, files)
    path = f"/vqacp/{CP_FILES[0]}"
    server.cut[path] = 200
    done = _run(tmp_path, server, "vqa_cp_v2", downloader=downloader)
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and server.url(path) in errors[0] and "rerun to resume" in errors[0], done.stderr
    folder = tmp_path / "data/raw/vqa_cp_v2"
    assert _published(folder) == [CP_FILES[0] + ".part"]
    assert (folder / (CP_FILES[0] + ".part")).read_bytes() == files[CP_FILES[0]][:200]

    again = _run(tmp_path, server, "vqa_cp_v2", downloader=downloader)
    assert again.returncode == 0, again.stderr
    assert [r for p, r in server.requests if p == path][-1] == "bytes=200-"
    assert _published(folder) == sorted(CP_FILES)
    assert all((folder / n).read_bytes() == d for n, d in files.items())


def test_resume_from_a_server_without_ranges_starts_over(tmp_path, server, downloader):
    files = _cp_files()
    _serve_cp(server, tmp_path, files)
    server.cut[f"/vqacp/{CP_FILES[0]}"] = 100
    assert _run(tmp_path, server, "vqa_cp_v2", downloader=downloader).returncode == 1
    server.ranges = False
    done = _run(tmp_path, server, "vqa_cp_v2", downloader=downloader)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "data/raw/vqa_cp_v2"
    assert _published(folder) == sorted(CP_FILES) and all((folder / n).read_bytes() == d for n, d in files.items())


def test_complete_part_from_a_killed_run_is_verified_without_downloading_again(tmp_path, server, downloader):
    """A run killed after the transfer but before the rename leaves a complete FILE.part: the rerun's resume asks
    for the bytes after its end (the server answers 416), then verifies and publishes it."""
    files = _cp_files()
    _serve_cp(server, tmp_path, files)
    folder = tmp_path / "data/raw/vqa_cp_v2"
    folder.mkdir(parents=True)
    (folder / (CP_FILES[0] + ".part")).write_bytes(files[CP_FILES[0]])
    done = _run(tmp_path, server, "vqa_cp_v2", downloader=downloader)
    assert done.returncode == 0, done.stderr
    assert server.requests[0] == (f"/vqacp/{CP_FILES[0]}", f"bytes={len(files[CP_FILES[0]])}-")
    assert _published(folder) == sorted(CP_FILES) and (folder / CP_FILES[0]).read_bytes() == files[CP_FILES[0]]


def test_good_download_is_verified_then_skipped(tmp_path, server):
    files = _cp_files()
    _serve_cp(server, tmp_path, files)
    done = _run(tmp_path, server, "vqa_cp_v2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("sha256 matches test-publisher") == 4
    folder = tmp_path / "data/raw/vqa_cp_v2"
    assert _published(folder) == sorted(CP_FILES) and all((folder / n).read_bytes() == d for n, d in files.items())
    record = (tmp_path / "data/raw/downloads.sha256").read_text()
    assert all(f"{_sha(d)} {len(d)} raw/vqa_cp_v2/{n} " in record for n, d in files.items())

    served = len(server.requests)
    again = _run(tmp_path, server, "vqa_cp_v2")
    assert again.returncode == 0 and len(server.requests) == served
    assert again.stdout.count("have ") == 4 and again.stderr == ""

    # A file changed after it was verified: a rerun compares sizes only, DOWNLOAD_RECHECK=1 re-hashes it.
    changed = folder / CP_FILES[2]
    changed.write_bytes(files[CP_FILES[2]].replace(b'"question_id": 3', b'"question_id": 4'))
    assert _run(tmp_path, server, "vqa_cp_v2").returncode == 0
    rechecked = _run(tmp_path, server, "vqa_cp_v2", DOWNLOAD_RECHECK="1")
    assert rechecked.returncode == 1 and len(_errors(rechecked)) == 1
    assert "sha256 mismatch" in _errors(rechecked)[0] and str(changed) in _errors(rechecked)[0]


def test_file_without_published_checksum_is_recorded_then_enforced(tmp_path, server):
    files = _cp_files()
    _serve_cp(server, tmp_path, files, published={n: None for n in files})
    done = _run(tmp_path, server, "vqa_cp_v2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("no published checksum: sha256 recorded") == 4
    record = (tmp_path / "data/raw/downloads.sha256").read_text()
    assert f"{_sha(files[CP_FILES[3]])} {len(files[CP_FILES[3]])} raw/vqa_cp_v2/{CP_FILES[3]} none-published" in record

    # A later copy (the first one deleted) must match the recorded one; here the host sends something else.
    folder = tmp_path / "data/raw/vqa_cp_v2"
    (folder / CP_FILES[3]).unlink()
    server.files[f"/vqacp/{CP_FILES[3]}"] = files[CP_FILES[3]].replace(b"questions", b"Questions")
    again = _run(tmp_path, server, "vqa_cp_v2")
    assert again.returncode == 1
    errors = _errors(again)
    assert len(errors) == 1 and "recorded" in errors[0] and CP_FILES[3] in errors[0], again.stderr
    assert _published(folder) == sorted(CP_FILES[:3])


def test_error_page_without_published_checksum_is_not_published(tmp_path, server):
    files = _cp_files()
    files[CP_FILES[0]] = b"<html><body>Service Unavailable</body></html>\n"  # served with status 200
    _serve_cp(server, tmp_path, files, published={n: None for n in files})
    done = _run(tmp_path, server, "vqa_cp_v2")
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and "not a complete JSON document" in errors[0], done.stderr
    assert _published(tmp_path / "data/raw/vqa_cp_v2") == []
    assert not (tmp_path / "data/raw/downloads.sha256").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@needs_unzip
def test_failed_zip_part_gets_no_done_marker(tmp_path, server):
    train = _zip({"mscoco_imgfeat/train2014_obj36.tsv": b"COCO_train2014_000000000009\t480\t640\n"})
    val = _zip({"mscoco_imgfeat/val2014_obj36.tsv": b"COCO_val2014_000000000042\t480\t640\n"})
    test = _zip({"mscoco_imgfeat/test2015_obj36.tsv": b"COCO_test2015_000000000001\t480\t640\n"})
    not_a_zip = b"PK\x03\x04 but not really a zip archive" + bytes(200)
    names = ("train2014", "val2014", "test2015")
    folder = tmp_path / "data/raw/mscoco_imgfeat"

    # 1. The val2014 zip is missing on the host: train2014 is extracted and marked, val2014 gets nothing.
    server.files["/unc/lxmert_data/mscoco_imgfeat/train2014_obj36.zip"] = train
    _write_table(tmp_path / "table.txt", {f"raw/mscoco_imgfeat/{n}_obj36.zip": z
                                          for n, z in zip(names, (train, val, test))})
    done = _run(tmp_path, server, "features")
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and server.url("/unc/lxmert_data/mscoco_imgfeat/val2014_obj36.zip") in errors[0]
    assert str(folder / "val2014_obj36.zip") in errors[0]
    assert "LXMERT_DATA_URL" in done.stderr and "drive.google.com" in done.stderr
    assert _published(folder) == [".train2014_obj36.zip.done", "train2014_obj36.tsv"]

    # 2. The host sends a file that matches the published checksum but is no zip: unzip fails, no marker,
    #    nothing extracted; the verified download stays so that a rerun does not fetch it again.
    server.files["/unc/lxmert_data/mscoco_imgfeat/val2014_obj36.zip"] = not_a_zip
    _write_table(tmp_path / "table.txt", {f"raw/mscoco_imgfeat/{n}_obj36.zip": z
                                          for n, z in zip(names, (train, not_a_zip, test))})
    again = _run(tmp_path, server, "features")
    assert again.returncode == 1
    errors = _errors(again)
    assert len(errors) == 1 and "unzip failed" in errors[0] and "no done marker" in errors[0], again.stderr
    assert server.url("/unc/lxmert_data/mscoco_imgfeat/val2014_obj36.zip") in errors[0]
    assert _published(folder) == [".train2014_obj36.zip.done", "train2014_obj36.tsv", "val2014_obj36.zip"]

    # 3. Both good: every zip extracted once, marked, and deleted.
    (folder / "val2014_obj36.zip").unlink()
    server.files["/unc/lxmert_data/mscoco_imgfeat/val2014_obj36.zip"] = val
    server.files["/unc/lxmert_data/mscoco_imgfeat/test2015_obj36.zip"] = test
    _write_table(tmp_path / "table.txt", {f"raw/mscoco_imgfeat/{n}_obj36.zip": z
                                          for n, z in zip(names, (train, val, test))})
    final = _run(tmp_path, server, "features")
    assert final.returncode == 0, final.stderr
    assert _published(folder) == sorted([f".{n}_obj36.zip.done" for n in names] + [f"{n}_obj36.tsv" for n in names])
    assert "have " + str(folder / "train2014_obj36.zip") + " (extracted)" in final.stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("part, variable, rel, mirror", [
    ("vqa_cp_v2", "VQACP_URL", "raw/vqa_cp_v2/vqacp_v2_train_questions.json", "iro.umontreal.ca/~agrawal/vqa-cp"),
    ("lxmert", "LXMERT_DATA_URL", "lxmert/model_LXRT.pth",
     "drive.google.com/drive/folders/1Gq1uLUk6NdD0CcJOptXjxE6ssY5XAuat"),
    ("vqa_v2", "VQA_URL", "raw/vqa_v2/v2_Questions_Train_mscoco.zip", "vision.ece.vt.edu/vqa/release_data/mscoco/vqa"),
])
def test_host_down_names_the_mirror_and_its_variable(tmp_path, server, part, variable, rel, mirror):
    _write_table(tmp_path / "table.txt", {rel: None})
    down = f"http://127.0.0.1:{_closed_port()}/gone"
    done = _run(tmp_path, server, part, **{variable: down})
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and errors[0].startswith(f"error: {down}/") and str(tmp_path / "data" / rel) in errors[0]
    hints = [line for line in done.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and variable in hints[0] and mirror in hints[0], done.stderr
    assert not (tmp_path / "data" / rel).exists() and not (tmp_path / "data" / (rel + ".part")).exists()


@needs_git
def test_vqa_vs_clone_failure_is_loud(tmp_path, server):
    missing = tmp_path / "no-such-repository"
    done = _run(tmp_path, server, "vqa_vs", VQAVS_REPO=str(missing))
    assert done.returncode == 1
    errors = _errors(done)
    assert len(errors) == 1 and str(missing) in errors[0] and str(tmp_path / "data/raw/vqa_vs/.release") in errors[0]
    assert "drive.google.com" in done.stderr and "VQAVS_REPO" in done.stderr
    assert not (tmp_path / "data/raw/vqa_vs/.release").exists()


def test_parts_run_on_after_a_failure_and_exit_nonzero(tmp_path, server):
    files = _cp_files()
    _serve_cp(server, tmp_path, files)
    all_ans = b'["yes", "no"]'
    server.files["/gh/data/lxmert/all_ans.json"] = all_ans
    table = (tmp_path / "table.txt").read_text() + f"lxmert/all_ans.json {len(all_ans)} {_sha(all_ans)} pinned\n"
    (tmp_path / "table.txt").write_text(table + "lxmert/model_LXRT.pth - - none-published\n")
    done = _run(tmp_path, server, "lxmert", "vqa_cp_v2")  # model_LXRT.pth is not served
    assert done.returncode == 1 and len(_errors(done)) == 1 and "model_LXRT.pth" in _errors(done)[0]
    assert _published(tmp_path / "data/raw/vqa_cp_v2") == sorted(CP_FILES)
    assert "failed: lxmert" in done.stderr


HUB_STUB = '''
import fnmatch, hashlib, json, os
from pathlib import Path
from types import SimpleNamespace

REPOS = json.loads(Path(os.environ["HUB_STUB"]).read_text())


class HfApi:
    def model_info(self, repo_id, files_metadata=False, **kwargs):
        siblings = []
        for name, spec in REPOS[repo_id]["files"].items():
            data = spec["text"].encode()
            if spec.get("lfs"):
                lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointer_size": 134}
                siblings.append(SimpleNamespace(rfilename=name, size=len(data), blob_id="0" * 40, lfs=lfs))
            else:
                blob = hashlib.sha1(b"blob %d\\0" % len(data) + data).hexdigest()
                siblings.append(SimpleNamespace(rfilename=name, size=len(data), blob_id=blob, lfs=None))
        return SimpleNamespace(sha=REPOS[repo_id]["sha"], siblings=siblings)


def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None, **kwargs):
    with open(os.environ["HUB_STUB_LOG"], "a") as log:
        log.write(json.dumps({"repo": repo_id, "revision": revision, "allow_patterns": allow_patterns}) + "\\n")
    for name, spec in REPOS[repo_id]["files"].items():
        if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(spec.get("served", spec["text"]))
    return local_dir
'''


def test_hub_takes_pytorch_weights_only_and_checks_them(tmp_path, server):
    """The hub part with a stand-in huggingface_hub (no network): which files it asks for, and the check of what
    arrived against the hub's sizes and sha256 / git blob ids."""
    def weights(text):
        return {"text": text, "lfs": True}
    repos = {
        "unc-nlp/lxmert-base-uncased": {"sha": "a" * 40, "files": {
            "config.json": {"text": "{}"}, "pytorch_model.bin": weights("pt"), "tf_model.h5": weights("tf"),
            "vocab.txt": {"text": "[PAD]\n"}, "tokenizer.json": {"text": "{}"}, "README.md": {"text": "#"}}},
        "uclanlp/visualbert-vqa-coco-pre": {"sha": "b" * 40, "files": {
            "config.json": {"text": "{}"}, "pytorch_model.bin": weights("pt")}},
        "bert-base-uncased": {"sha": "c" * 40, "files": {
            "config.json": {"text": "{}"}, "model.safetensors": weights("st"), "pytorch_model.bin": weights("pt"),
            "tf_model.h5": weights("tf"), "flax_model.msgpack": weights("flax"), "rust_model.ot": weights("rs"),
            "coreml/fill-mask/float32_model.mlpackage/Data/com.apple.CoreML/weights/weight.bin": weights("c"),
            "onnx/model.safetensors": weights("o"), "vocab.txt": {"text": "[PAD]\n"},
            "tokenizer.json": {"text": "{}"}, "tokenizer_config.json": {"text": "{}"}}},
    }
    stub = tmp_path / "stub" / "huggingface_hub"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(HUB_STUB)
    spec, log = tmp_path / "repos.json", tmp_path / "calls.jsonl"
    spec.write_text(json.dumps(repos))
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "stub"), "HUB_STUB": str(spec),
           "HUB_STUB_LOG": str(log)}
    done = _run(tmp_path, server, "hub", **env)
    assert done.returncode == 0, done.stderr
    calls = {c["repo"]: c for c in map(json.loads, log.read_text().splitlines())}
    assert calls["unc-nlp/lxmert-base-uncased"]["allow_patterns"] == [
        "config.json", "pytorch_model.bin", "tokenizer.json", "vocab.txt"]
    assert calls["uclanlp/visualbert-vqa-coco-pre"]["allow_patterns"] == ["config.json", "pytorch_model.bin"]
    assert calls["bert-base-uncased"]["allow_patterns"] == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert all(calls[r]["revision"] == repos[r]["sha"] for r in repos)
    models = tmp_path / "data/models"
    assert sorted(p.name for p in (models / "bert-base-uncased").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]

    # What arrives differs from what the hub lists: one error line, the file deleted, the mirror named.
    repos["bert-base-uncased"]["files"]["model.safetensors"]["served"] = "sT"
    spec.write_text(json.dumps(repos))
    (models / "bert-base-uncased" / "model.safetensors").unlink()
    bad = _run(tmp_path, server, "hub", **env)
    assert bad.returncode == 1
    errors = _errors(bad)
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "sha256" in errors[0], bad.stderr
    assert errors[0].startswith("error: https://huggingface.co/bert-base-uncased -> ")
    assert "HF_ENDPOINT=https://hf-mirror.com" in bad.stderr
    assert not (models / "bert-base-uncased" / "model.safetensors").exists()
