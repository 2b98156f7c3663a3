"""The weight downloader (runtime/fetch.py) both ways it runs, through the same share faults,
against the Seafile stand-in.

`control` is the module imported as operations/model.py's fetch_to_cache uses it (into the
content-addressed cache, in this process); `host` is the same file run as a program with a
job file, as the weights operation runs it on a host. Every fault must end in a resumed
download or a clear error, and never in a wrong file where the weights belong.
"""

import ast
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.pyindex import StaticServer
from lab.seafile import SeafileStandIn
from operations.model import FETCH
from operations.settings import VERIFIED
from runtime import fetch as fetcher

TOKEN = "674208019e314311ab5c"
FOLDER = "/chatglm-6b-int4/"
NAME = "pytorch_model.bin"
SIZE = 700_001  # eleven of the fileserver's 64 KiB chunks, and a bit
FILE_PATH = FOLDER + NAME


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    (root / FOLDER.strip("/")).mkdir()
    data = os.urandom(SIZE)
    (root / FOLDER.strip("/") / NAME).write_bytes(data)
    (root / FOLDER.strip("/") / "ice_text.model").write_bytes(b"sp" * 100)
    return root, data


@pytest.fixture(scope="module")
def seaf(share):
    server = SeafileStandIn(shares={TOKEN: share[0]}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def clean(seaf):
    seaf.clear_faults()
    seaf.reset_stats()


class Result:
    def __init__(self, ok, error, placed, partial):
        self.ok, self.error, self.placed, self.partial = ok, error, placed, partial


def run_control(seaf, tmp, data, size=SIZE, partial=b"", name=NAME, fsize=None, lock_wait=10):
    """The downloader as fetch_to_cache uses it: find, download into the cache.
    fsize: a file size limit (RLIMIT_FSIZE) while it downloads."""
    oid = hashlib.sha256(data).hexdigest()
    target = tmp / "cache" / "blobs" / oid
    target.parent.mkdir(parents=True, exist_ok=True)
    if partial:
        target.with_name(oid + ".partial").write_bytes(partial)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        source = fetcher.Share(f"{seaf.url}/d/{TOKEN}/", FOLDER)
        path = source.find(name, size, pause=0)
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, limits[1]))
        fetcher.download(source, path, str(target), oid, size, f"{name} (control cache)",
                         "weights_cache", lambda: target.is_file() and target.stat().st_size == size,
                         hidden=False, fsync=False, pause=0, attempts=3, lock_wait=lock_wait)
        error = ""
    except fetcher.Final as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    placed = target.read_bytes() if target.exists() else None
    left = target.with_name(oid + ".partial")
    return Result(not error, error, placed, left.read_bytes() if left.exists() else None)


def write_job(tmp, mode, source, files, folder=FOLDER) -> Path:
    model_dir = tmp / "model"
    model_dir.mkdir(exist_ok=True)
    job = tmp / "job.json"
    job.write_text(json.dumps({"mode": mode, "source": source, "folder": folder,
                               "model_dir": str(model_dir), "stamps": VERIFIED, "files": files,
                               "attempts": 6}))
    return job


def run_host(seaf, tmp, data, size=SIZE, partial=b"", name=NAME, mirror=None, fsize=None,
             lock_wait=10):
    """runtime/fetch.py run with a job file, as the weights operation runs it on a host.
    fsize: a file size limit (RLIMIT_FSIZE) for the fetcher's process."""
    oid = hashlib.sha256(data).hexdigest()
    model_dir = tmp / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / name).write_text(pointer_text(oid, size))
    if partial:
        (model_dir / f".{name}.partial").write_bytes(partial)
    files = [{"name": name, "oid": oid, "size": size}]
    job = (write_job(tmp, "mirror", mirror, files) if mirror else
           write_job(tmp, "seafile", f"{seaf.url}/d/{TOKEN}/", files))
    limit = fsize and (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)))
    proc = subprocess.run([sys.executable, str(FETCH), str(job), "--attempts", "3", "--backoff", "0",
                           "--lock-wait", str(lock_wait)],
                          capture_output=True, text=True, timeout=60, preexec_fn=limit or None)
    errors = [l[len("ERROR: "):] for l in proc.stderr.splitlines() if l.startswith("ERROR: ")]
    assert (proc.returncode == 0) == (not errors), proc.stderr
    placed = (model_dir / name).read_bytes()
    stamp = model_dir / VERIFIED / name
    if proc.returncode == 0:
        assert stamp.read_text().strip() == oid
    else:
        # Never a wrong file in place: the pointer stays until the bytes are verified.
        assert placed == pointer_text(oid, size).encode() and not stamp.exists()
        placed = None
    left = model_dir / f".{name}.partial"
    return Result(proc.returncode == 0, "\n".join(errors), placed,
                  left.read_bytes() if left.exists() else None)


def pointer_text(oid, size):
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


DRIVERS = {"control": run_control, "host": run_host}


def resumed(seaf) -> bool:
    """Resumed, not restarted: at most the bytes of the read the break spoiled come twice
    (urllib3 drops a short read; http.client keeps it)."""
    sent = seaf.stats()["per_file"][FILE_PATH]
    return SIZE <= sent <= SIZE + fetcher.BLOCK


@pytest.fixture(params=sorted(DRIVERS))
def fetch(request, seaf, share, tmp_path):
    driver = DRIVERS[request.param]
    return lambda **kw: driver(seaf, tmp_path, share[1], **kw)


def test_clean_download(fetch, seaf, share):
    r = fetch()
    assert r.ok and r.placed == share[1] and r.partial is None
    stats = seaf.stats()
    assert stats["per_file"] == {FILE_PATH: SIZE} and stats["redirects"] == 1


def test_hashing_on_the_downloading_thread_gives_the_same_result(seaf, share, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(fetcher, "HASH_THREAD", False)
    seaf.add_faults([{"match": NAME, "kind": "cut", "after": 300_000}])
    r = run_control(seaf, tmp_path, share[1])
    assert r.ok and r.placed == share[1] and resumed(seaf)


def test_connection_cut_mid_file_resumes_with_range(fetch, seaf, share):
    seaf.add_faults([{"match": NAME, "kind": "cut", "after": 300_000}])
    r = fetch()
    assert r.ok and r.placed == share[1]
    assert resumed(seaf) and seaf.stats()["redirects"] == 2


def test_expired_token_mid_file_resumes_through_a_fresh_redirect(fetch, seaf, share):
    seaf.add_faults([{"match": NAME, "kind": "expire", "after": 200_000}])
    r = fetch()
    assert r.ok and r.placed == share[1]
    assert resumed(seaf) and seaf.stats()["redirects"] == 2


def test_corrupted_byte_is_caught_and_fetched_again(fetch, seaf, share):
    seaf.add_faults([{"match": NAME, "kind": "corrupt", "offset": 500_000}])
    r = fetch()
    assert r.ok and r.placed == share[1]
    assert seaf.stats()["per_file"] == {FILE_PATH: 2 * SIZE}


def test_corrupted_every_time_is_a_clear_error(fetch, seaf):
    seaf.add_faults([{"match": NAME, "kind": "corrupt", "offset": 10, "times": -1}])
    r = fetch()
    assert not r.ok and r.placed is None and r.partial is None
    assert "differs from the LFS pointer" in r.error and "twice" in r.error


def test_http_500_once_is_retried(fetch, seaf, share):
    seaf.add_faults([{"match": NAME, "kind": "status", "code": 500}])
    r = fetch()
    assert r.ok and r.placed == share[1]


def test_http_500_always_is_a_clear_error_and_keeps_the_partial(fetch, seaf, share):
    seaf.add_faults([{"match": NAME, "kind": "status", "code": 500, "times": -1}])
    r = fetch(partial=share[1][:100_000])
    assert not r.ok and r.placed is None
    assert "HTTP 500" in r.error and "3 tries in a row" in r.error and "rerun to resume" in r.error
    assert r.partial == share[1][:100_000]  # the next run resumes from here


def test_rerun_resumes_a_partial_file(fetch, seaf, share):
    r = fetch(partial=share[1][:400_000])
    assert r.ok and r.placed == share[1]
    assert seaf.stats()["per_file"] == {FILE_PATH: SIZE - 400_000}


def test_listing_500_once_is_retried(fetch, seaf, share):
    seaf.add_faults([{"match": FOLDER, "kind": "status", "code": 500}])
    assert fetch().ok


def test_missing_file_is_a_clear_error_before_any_download(fetch, seaf):
    r = fetch(name="pytorch_model-00009-of-00009.bin")
    assert not r.ok and "is not in folder" in r.error and "pytorch_model.bin" in r.error
    assert seaf.stats()["bytes_sent"] == 0


def test_share_size_differing_from_the_pointer_is_a_clear_error(fetch, seaf):
    r = fetch(size=SIZE + 1)
    assert not r.ok and "the LFS pointer says" in r.error and str(SIZE + 1) in r.error
    assert seaf.stats()["bytes_sent"] == 0


@pytest.fixture
def mirror(share):
    server = StaticServer(str(share[0]), port=0).start()
    yield f"{server.url}{FOLDER}"
    server.stop()


def test_mirror_download(seaf, share, tmp_path, mirror):
    r = run_host(seaf, tmp_path, share[1], mirror=mirror)
    assert r.ok and r.placed == share[1]


def test_mirror_without_range_support_starts_over(seaf, share, tmp_path, mirror):
    # The lab's static server ignores Range (200): the partial must not be appended to.
    r = run_host(seaf, tmp_path, share[1], mirror=mirror, partial=share[1][:1000])
    assert r.ok and r.placed == share[1]


def test_mirror_missing_file_is_a_clear_error(seaf, share, tmp_path, mirror):
    r = run_host(seaf, tmp_path, share[1], mirror=mirror, name="nothing.bin")
    assert not r.ok and "HTTP 404" in r.error


def test_free_space_is_checked_before_downloading(seaf, share, tmp_path):
    oid = hashlib.sha256(share[1]).hexdigest()
    files = [{"name": NAME, "oid": oid, "size": 1 << 60}]
    job = write_job(tmp_path, "seafile", f"{seaf.url}/d/{TOKEN}/", files)
    proc = subprocess.run([sys.executable, str(FETCH), str(job)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and "GB needed for the weights" in proc.stderr
    assert seaf.stats()["requests"] == 0
    with pytest.raises(fetcher.DiskError, match="GB needed; free some space .or set weights_cache"):
        fetcher.download(fetcher.Share(f"{seaf.url}/d/{TOKEN}/"), FILE_PATH, str(tmp_path / "x"),
                         oid, 1 << 60, "x", "weights_cache", lambda: False, hidden=False)


def test_fetcher_is_standard_library_python_3_8():
    source = FETCH.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def under_greenlet_guard(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "_greenlets()" in ast.unparse(node.test):
                return True
        return False

    imports = [(n.names[0].name if isinstance(n, ast.Import) else n.module, n)
               for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    # gevent only where gevent has already patched the process (pyinfra's, on the control).
    outside = {name.split(".")[0] for name, node in imports
               if not (name.startswith("gevent") and under_greenlet_guard(node))}
    assert outside <= set(sys.stdlib_module_names), outside - set(sys.stdlib_module_names)
    assert any(name.startswith("gevent") for name, _ in imports)  # the guard above is exercised


def test_progress_lines_on_stdout_every_few_seconds(seaf, share, tmp_path, monkeypatch, capsys):
    """A host's download says where it is (bytes, rate, ETA) on stdout, at most every
    PROGRESS_EVERY seconds and once at the end."""
    seaf.add_faults([{"match": NAME, "kind": "slow", "delay": 1.5}])
    monkeypatch.setattr(fetcher, "PROGRESS_EVERY", 0.5)
    oid = hashlib.sha256(share[1]).hexdigest()
    files = [{"name": NAME, "oid": oid, "size": SIZE}]
    job = write_job(tmp_path, "seafile", f"{seaf.url}/d/{TOKEN}/", files)
    (tmp_path / "model" / NAME).write_text(pointer_text(oid, SIZE))
    assert fetcher.main([str(job), "--backoff", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 2 <= len(lines) <= 5, lines
    assert re.fullmatch(r"pytorch_model\.bin: 683\.6 KiB of 683\.6 KiB \(100%\), .*/s, ETA 0m00s",
                        lines[-1]), lines


# -- the disk fills up: final at once, the .partial kept for the rerun, nothing in place

def settled(seaf):
    """The stand-in's stats once its threads are done counting (a response the client
    dropped, or the last block of one it finished, may be counted a moment later)."""
    last = seaf.stats()
    while True:
        time.sleep(0.1)
        now = seaf.stats()
        if now == last:
            return now
        last = now


def partial_path(driver, tmp, data):
    if driver == "control":
        return tmp / "cache" / "blobs" / (hashlib.sha256(data).hexdigest() + ".partial")
    return tmp / "model" / f".{NAME}.partial"


def check_disk_error(r, seaf, share, tmp, driver, strerror):
    data = share[1]
    part = partial_path(driver, tmp, data)
    assert_disk_error(r, seaf, driver, part, NAME, data, strerror, least=1)


def assert_disk_error(r, seaf, driver, part, name, data, strerror, least):
    """A disk error stopped the download at once, kept what was written (at least `least`
    bytes, a prefix of data) and said where, how much, and which setting frees it."""
    assert not r.ok and r.placed is None
    assert least <= len(r.partial) < len(data) and r.partial == data[:len(r.partial)]
    who = f"{name} (control cache)" if driver == "control" else name
    setting = "weights_cache" if driver == "control" else "install_dir"
    assert r.error == (
        f"{who}: {strerror} while writing {part} ({len(r.partial)} of {len(data)} bytes "
        f"written); free space under {part.parent} (or set {setting} to a larger filesystem) "
        "and rerun: the download resumes")
    assert seaf.stats()["redirects"] == 1  # stopped at once: no retry


def test_file_size_limit_is_final_keeps_the_partial_and_the_rerun_resumes(
        request, fetch, seaf, share, tmp_path):
    driver = request.node.callspec.params["fetch"]
    r = fetch(fsize=300_000)  # EFBIG past 300000 bytes, as a full disk would stop it
    check_disk_error(r, seaf, share, tmp_path, driver, "File too large")
    assert len(r.partial) == 300_000
    settled(seaf)
    seaf.reset_stats()
    r = fetch()
    assert r.ok and r.placed == share[1]
    assert settled(seaf)["per_file"] == {FILE_PATH: SIZE - 300_000}


BIG = "big.bin"
BIG_SIZE = (3 << 20) + 1  # three of the downloaders' 1 MiB blocks, and a byte


@pytest.fixture(scope="module")
def big(share):
    data = os.urandom(BIG_SIZE)
    (share[0] / FOLDER.strip("/") / BIG).write_bytes(data)
    return data


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere): room for big.bin when its download
    starts (the free-space check passes), until the test fills it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(path):
    """Write path until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == 28  # ENOSPC


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_disk_full_is_final_keeps_the_partial_and_the_rerun_resumes(driver, seaf, big,
                                                                    small_fs):
    seaf.add_faults([{"match": BIG, "kind": "slow", "delay": 1.0}])  # about 3 s
    results = []
    worker = threading.Thread(target=lambda: results.append(
        DRIVERS[driver](seaf, small_fs, big, size=BIG_SIZE, name=BIG)))
    worker.start()
    part = (small_fs / "cache" / "blobs" / (hashlib.sha256(big).hexdigest() + ".partial")
            if driver == "control" else small_fs / "model" / f".{BIG}.partial")
    deadline = time.monotonic() + 10
    while not (part.exists() and part.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.01)
    written = part.stat().st_size if part.exists() else 0
    fill(small_fs / "filler")  # something else fills the disk in the middle of the download
    worker.join(30)
    r = results[0]
    # Nothing already on disk when it filled is lost (the partial only grows).
    assert_disk_error(r, seaf, driver, part, BIG, big, "No space left on device",
                      least=max(written, 1))
    kept = len(r.partial)
    (small_fs / "filler").unlink()  # room made: the rerun fetches only the rest
    settled(seaf)
    seaf.reset_stats()
    r = DRIVERS[driver](seaf, small_fs, big, size=BIG_SIZE, name=BIG)
    assert r.ok and r.placed == big
    assert settled(seaf)["per_file"] == {FOLDER + BIG: BIG_SIZE - kept}


# -- two downloaders of one file at once (a killed deploy's fetcher lives on, a rerun)

def start_first(driver, seaf, share, tmp):
    """A slow first download (about 2 s) running in the background; returns a join()."""
    seaf.add_faults([{"match": NAME, "kind": "slow", "delay": 3.0}])
    lock = (tmp / "cache" / "blobs" / (hashlib.sha256(share[1]).hexdigest() + ".lock")
            if driver == "control" else tmp / "model" / f".{NAME}.lock")
    results = []
    if driver == "control":
        worker = threading.Thread(target=lambda: results.append(run_control(seaf, tmp, share[1])))
    else:
        worker = threading.Thread(target=lambda: results.append(run_host(seaf, tmp, share[1])))
    worker.start()
    deadline = time.monotonic() + 10
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), "the first download never took its lock"
    return lambda: (worker.join(30), results[0])[1], lock


def test_second_downloader_waits_and_finds_the_file_done(request, seaf, share, tmp_path):
    for driver in ("control", "host"):
        tmp = tmp_path / driver
        tmp.mkdir()
        settled(seaf)
        seaf.reset_stats()
        join, lock = start_first(driver, seaf, share, tmp)
        second = DRIVERS[driver](seaf, tmp, share[1], lock_wait=20)
        first = join()
        assert first.ok and second.ok and first.placed == second.placed == share[1]
        assert settled(seaf)["per_file"] == {FILE_PATH: SIZE}  # fetched once, not twice
        assert not lock.exists()  # removed by its last holder


def test_second_downloader_gives_up_with_a_clear_error(request, seaf, share, tmp_path):
    for driver in ("control", "host"):
        tmp = tmp_path / driver
        tmp.mkdir()
        join, lock = start_first(driver, seaf, share, tmp)
        second = DRIVERS[driver](seaf, tmp, share[1], lock_wait=0.3)
        first = join()
        assert first.ok and first.placed == share[1] and not lock.exists()
        assert not second.ok
        what = f"{NAME} (control cache)" if driver == "control" else NAME
        assert re.fullmatch(
            rf"{re.escape(what)}: another download of it is running \(pid \d+ holds "
            rf"{re.escape(str(lock))}\); wait for it to end, or stop it, and rerun",
            second.error), second.error


def test_fetcher_command_line(tmp_path):
    """The fetcher reads its options by hand (no argparse): the forms argparse took, its
    exit status 2 and a usage line on a bad one, --help."""
    job = write_job(tmp_path, "mirror", "http://127.0.0.1:9/", [])

    def run(*args):
        return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True,
                              text=True, timeout=30)

    assert run(str(job), "--attempts", "2", "--backoff=0.5", "--lock-wait", "1").returncode == 0
    for bad, says in (([str(job), "--attempts", "x"], "invalid int value: 'x'"),
                      ([str(job), "--lock-wait"], "argument --lock-wait: expected a value"),
                      ([str(job), "--retries", "3"], "unrecognized argument --retries"),
                      (["--attempts", "3"], "the job file is missing")):
        proc = run(*bad)
        assert proc.returncode == 2 and says in proc.stderr and "usage:" in proc.stderr, bad
    helped = run("--help")
    assert helped.returncode == 0 and "--lock-wait SECONDS" in helped.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    proc = run(str(broken))
    assert proc.returncode == 2 and f"ERROR: the job file {broken} cannot be read" in proc.stderr
