"""Client for Seafile share links (the Tsinghua cloud), run on the control machine.

List a shared folder through the dirents API, download a file through the
`dl=1` redirect, resume with Range after a break (asking for a fresh redirect
every time, since the access token in it expires), and verify sha256 and size
while the bytes stream past. A file is only ever renamed into place once verified.

The host-side downloader (templates/fetch_weights.py.j2, standard library only)
follows the same rules; tests/test_weights_download.py runs both through the same faults:
  - a try that brings bytes resets the count of failed tries; ATTEMPTS tries in a row
    without a byte give up (the .partial file stays, so a rerun resumes it);
  - 5xx answers and broken connections are retried after a back-off; the fileserver's
    400/403/404 (a dead access token) is retried through a fresh dl=1 redirect;
  - seahub's 400/403/404 and a page instead of a redirect (missing file, password) are
    final: retrying cannot help;
  - a complete file whose sha256 differs from the pointer is deleted and fetched once
    more from the start; a second mismatch is final;
  - a failed write (disk full: ENOSPC, EDQUOT, EFBIG, or any other error of the disk) is
    final at once, never retried; the .partial file keeps what was written, so a rerun
    resumes once there is room;
  - one download of a file at a time: an exclusive flock on <file>.lock beside the
    .partial file, waited for LOCK_WAIT seconds, then a clear error naming the holder.

Speed (bench/weight_fetch.py): the body is read in BLOCK-sized pieces straight into a few
reused buffers (http.client's readinto, no copies), written at once on the downloading
thread, and hashed on a native worker thread that the buffers reach through a short FIFO
(hashlib releases the GIL on large buffers), so hashing overlaps the reads where a core is
free; on this 2-core machine, with the stand-in busy on one core, hashing in line
(HASH_THREAD = False) measured the same within the noise (shuffled rounds). No fsync: the
blob is a cache entry, and the host hashes every file again before it replaces a pointer;
an fsync would put the flush of the whole file to disk inside the download (curl does
not flush either).
"""

import collections
import errno
import fcntl
import hashlib
import http.client
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import requests
import urllib3
from tqdm import tqdm

BLOCK = 1 << 20  # bytes of a read from the network and of a hash update
# Written in 256 KiB pieces: on Linux 6.x a 1 MiB write into the page cache asks for large
# folios, and where memory must be compacted for them one 2 GiB download spent 2-5 s more
# in the kernel (measured: 2 GiB in 1 MiB writes 2.0-5.1 s, in 256 KiB writes 0.44-0.94 s).
WRITE = 256 << 10
DEPTH = 4  # buffers in flight between the downloading thread and the hashing thread
# A broken connection loses at most the bytes of one read (http.client returns a short
# read at a close; a reset in the middle of a read drops what that read had).
READ = BLOCK
ATTEMPTS = 6
BACKOFF = 0.5  # seconds before the second try, doubled for each further one, at most 10
TIMEOUT = (30, 60)
HASH_THREAD = True  # False: hash on the downloading thread (bench/weight_fetch.py -inline)
LOCK_WAIT = 10.0  # seconds to wait for another download of the same file to end
# Errors of a read from the network: worth another try.
_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                   http.client.HTTPException)


class ShareError(Exception):
    """The share cannot give us the file; the message says what and why."""


class _Retry(Exception):
    """A failure worth another try."""


class DiskError(ShareError):
    """Writing the downloaded bytes failed (disk full, quota, file size limit): final."""


def _native_executor() -> ThreadPoolExecutor:
    """One native worker thread, also under pyinfra's gevent monkey-patching (where a
    patched threading.Thread is a greenlet and would hash on the hub's own thread)."""
    try:
        from gevent import monkey
        if monkey.is_module_patched("threading"):
            from gevent.threadpool import ThreadPoolExecutor as NativeExecutor
            return NativeExecutor(1)
    except ImportError:
        pass
    return ThreadPoolExecutor(1)


class _Lock:
    """An exclusive flock on path, for one download of a file at a time (across processes:
    two deploys sharing a cache). Waits up to `wait` seconds, then raises ShareError naming
    the holder's pid (written in the file). The holder removes the file before it lets go,
    so a lock taken on a file already removed is dropped and taken again on the new one."""

    def __init__(self, path: Path, what: str, wait: float = LOCK_WAIT):
        self.path, self.what, self.wait = path, what, wait
        self.fd = None

    def __enter__(self):
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                        os.close(fd)
                        raise ShareError(
                            f"{self.what}: another download of it is running (pid {holder} "
                            f"holds {self.path}); wait for it to end, or stop it, and "
                            "rerun") from None
                    time.sleep(0.2)
            try:
                mine = os.stat(self.path)
            except FileNotFoundError:
                mine = None
            here = os.fstat(fd)
            if mine and (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino):
                break
            os.close(fd)  # the holder before us removed it: lock the file there now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink(missing_ok=True)  # while still held: no lock file is left behind
        finally:
            os.close(self.fd)


def parse_share(url: str) -> tuple[str, str]:
    """'https://host/d/<token>/' -> ('https://host', '<token>')."""
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if len(parts) < 2 or parts[-2] != "d":
        raise ShareError(f"{url!r} is not a Seafile folder share link (https://HOST/d/TOKEN/)")
    return f"{parsed.scheme}://{parsed.netloc}", parts[-1]


def _error(resp) -> str:
    try:
        return resp.json().get("error_msg", resp.text[:200])
    except ValueError:
        return resp.text[:200].strip()


def _backoff(fails: int, backoff: float):
    time.sleep(min(backoff * 2 ** (fails - 1), 10))


def list_folder(share_url: str, path: str = "/", session=None, attempts: int = ATTEMPTS,
                backoff: float = BACKOFF) -> list[dict]:
    """The dirent_list of a folder of the share (5xx and broken connections retried)."""
    base, token = parse_share(share_url)
    http = session or requests
    for attempt in range(1, attempts + 1):
        try:
            resp = http.get(f"{base}/api/v2.1/share-links/{token}/dirents/",
                            params={"path": path}, timeout=TIMEOUT)
        except requests.RequestException as error:
            last = f"{type(error).__name__}: {error}"
        else:
            if resp.status_code == 200:
                return resp.json()["dirent_list"]
            last = f"HTTP {resp.status_code} {_error(resp)}"
            if resp.status_code < 500:
                break
        if attempt < attempts:
            _backoff(attempt, backoff)
    raise ShareError(f"listing {path!r} of {share_url} failed: {last}")


def find_file(share_url: str, folder: str, name: str, size: int, **kwargs) -> str:
    """The share's path of folder/name, checked against the pointer's size before any download."""
    listing = {d.get("file_name"): d for d in list_folder(share_url, folder, **kwargs)
               if not d.get("is_dir")}
    if name not in listing:
        raise ShareError(f"{name!r} is not in folder {folder!r} of {share_url} (it holds: "
                         f"{', '.join(sorted(listing)) or 'no files'}); check weights_share and "
                         "weights_share_path")
    if listing[name].get("size") != size:
        raise ShareError(f"{folder.rstrip('/')}/{name} is {listing[name].get('size')} bytes in the "
                         f"share but the LFS pointer says {size}: the share holds another "
                         "version of the weights than the pinned model revision")
    return listing[name]["file_path"]


def _redirect(http, base, token, file_path) -> str:
    """The fileserver URL of a fresh dl=1 redirect."""
    try:
        resp = http.get(f"{base}/d/{token}/files/", params={"p": file_path, "dl": "1"},
                        allow_redirects=False, timeout=TIMEOUT)
    except requests.RequestException as error:
        raise _Retry(f"dl=1: {type(error).__name__}: {error}") from None
    if resp.status_code in (301, 302, 303, 307, 308):
        return requests.compat.urljoin(resp.url, resp.headers["Location"])
    if resp.status_code == 200:
        # Seafile answers a missing file (or a password form) with a page, not a redirect.
        raise ShareError(f"{file_path!r}: the share answered a page instead of a download "
                         "redirect: the file does not exist there, or the share needs a password")
    if resp.status_code >= 500:
        raise _Retry(f"dl=1 answered HTTP {resp.status_code}")
    raise ShareError(f"{file_path!r}: the share answered HTTP {resp.status_code} {_error(resp)}")


class _Partial:
    """The .partial file of a download and the sha256 of what it holds.

    append() writes a block at once and queues it for the hashing thread (or hashes it at
    once without HASH_THREAD); the buffer of a block is only handed out again once its hash
    update is done. sync() waits for every queued update, so `digest` then covers exactly
    the `have` bytes written.
    """

    def __init__(self, path: Path, size: int, what: str = "the control cache"):
        self.path, self.size, self.what = path, size, what
        self.buffers = [memoryview(bytearray(BLOCK)) for _ in range(DEPTH)]
        self.hashing = collections.deque()  # futures of queued hash updates, oldest first
        self.hasher = _native_executor() if HASH_THREAD else None
        self.fd, self.turn = None, 0
        self.digest, self.have = hashlib.sha256(), 0
        if path.exists() and path.stat().st_size <= size:
            with open(path, "rb") as f:
                while n := f.readinto(self.buffers[0]):
                    self.digest.update(self.buffers[0][:n])
                    self.have += n
        else:
            path.unlink(missing_ok=True)

    def buffer(self) -> memoryview:
        """A free buffer of BLOCK bytes (waiting for the oldest hash update when all are queued)."""
        if len(self.hashing) == DEPTH:
            self.hashing.popleft().result()
        self.turn = (self.turn + 1) % DEPTH
        return self.buffers[self.turn]

    def sync(self):
        while self.hashing:
            self.hashing.popleft().result()

    def _disk_error(self, error: OSError) -> DiskError:
        folder = self.path.parent
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = (f"free space under {folder} (or set weights_cache to a larger filesystem) "
                   "and rerun: the download resumes")
        else:
            fix = f"check the disk under {folder} and rerun: the download resumes"
        return DiskError(f"{self.what}: {error.strerror or error} while writing {self.path} "
                         f"({self.have} of {self.size} bytes written); {fix}")

    def append(self, block: memoryview):
        """Write block (a buffer from buffer()) to the file, then queue its hash update."""
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            done = 0
            while done < len(block):
                written = os.write(self.fd, block[done:done + WRITE])
                self.have += written
                done += written
        except OSError as error:
            self._hash(block[:done])
            self.sync()
            raise self._disk_error(error) from None
        self._hash(block)

    def _hash(self, block: memoryview):
        if self.hasher is None:
            self.digest.update(block)
        else:
            self.hashing.append(self.hasher.submit(self.digest.update, block))

    def restart(self):
        self.sync()
        self._close()
        self.path.unlink(missing_ok=True)
        self.digest, self.have = hashlib.sha256(), 0

    def _close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError as error:  # a delayed write error (NFS, quota) shows up here
                raise self._disk_error(error) from None

    def close(self):
        """Release the file and the hashing thread (the file itself stays)."""
        try:
            self.sync()
            self._close()
        finally:
            if self.hasher is not None:
                self.hasher.shutdown()


def _readinto(resp):
    """The fastest way to read the body into a buffer: http.client's own readinto (one
    copy, socket to buffer) when urllib3 has nothing to decode, else urllib3's."""
    fp = getattr(resp.raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not resp.headers.get("Content-Encoding"):
        return fp.readinto
    return resp.raw.readinto


def _get_range(http, url: str, part: _Partial, bar) -> None:
    """Append what the fileserver sends from part.have on; raise _Retry on any failure of
    the network, DiskError when the bytes cannot be written."""
    start = part.have
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        with http.get(url, headers=headers, stream=True, timeout=TIMEOUT) as resp:
            if resp.status_code == 200 and start:
                part.restart()  # the server ignored Range: start over rather than append twice
                bar.reset(total=part.size)
            elif resp.status_code == 206:
                expected = f"bytes {start}-{part.size - 1}/{part.size}"
                if resp.headers.get("Content-Range") != expected:
                    part.restart()
                    raise _Retry(f"Content-Range {resp.headers.get('Content-Range')!r}, "
                                 f"expected {expected!r}")
            elif resp.status_code == 416:
                part.restart()
                raise _Retry("HTTP 416: the partial file does not fit the file; starting over")
            elif resp.status_code != 200:
                raise _Retry(f"HTTP {resp.status_code} {_error(resp)}")
            readinto = _readinto(resp)
            while True:
                block = part.buffer()
                try:
                    n = readinto(block)
                except _NETWORK_ERRORS as error:
                    raise _Retry(f"{type(error).__name__}: {error}") from None
                if not n:
                    break
                if part.have + n > part.size:
                    part.restart()
                    raise _Retry(f"the server sent more than the pointer's {part.size} bytes")
                part.append(block[:n])
                bar.update(n)
    except requests.RequestException as error:
        raise _Retry(f"{type(error).__name__}: {error}") from None
    if part.have < part.size:
        raise _Retry(f"the connection closed after {part.have} of {part.size} bytes")


def check_free(path: Path, need: int, what: str):
    """Raise ShareError when the filesystem of path has less than need bytes available."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ShareError(f"{what} {path}: {free / 1e9:.2f} GB free, {need / 1e9:.2f} GB needed; "
                         "free some space (or point weights_cache elsewhere) and rerun")


def download(share_url: str, file_path: str, dest: Path, sha256: str, size: int,
             progress: bool = True, session=None, attempts: int = ATTEMPTS,
             backoff: float = BACKOFF, lock_wait: float = LOCK_WAIT) -> Path:
    """Fetch one file of the share into dest, verified; resumes dest's .partial file.

    + share_url: the folder share link
    + file_path: the file's path inside the share ('/chatglm-6b-int4/pytorch_model.bin')
    + dest: where the verified file ends up
    + sha256, size: what the LFS pointer says the file must be
    + attempts: tries in a row without progress before giving up
    + backoff: seconds to wait after the first failed try (doubled after each further one)
    + lock_wait: seconds to wait for another download of dest (dest.lock) to end

    dest only ever gets its name once verified, so a dest of the right size found once the
    lock is held (another process finished it meanwhile) is kept as it is.
    """
    base, token = parse_share(share_url)
    http = session or requests.Session()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(dest.with_name(dest.name + ".lock"), f"the control cache: {dest}", lock_wait):
        if dest.is_file() and dest.stat().st_size == size:
            return dest
        part = _Partial(dest.with_name(dest.name + ".partial"), size)
        try:
            check_free(dest.parent, size - part.have, "the control cache")
            _fetch(http, base, token, file_path, part, sha256, progress, attempts, backoff)
        finally:
            part.close()
        part.path.replace(dest)
    return dest


def _fetch(http, base, token, file_path, part, sha256, progress, attempts, backoff):
    size = part.size
    bar = tqdm(total=size, initial=part.have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=Path(file_path).name, disable=not progress, leave=False)
    fails, mismatches, last = 0, 0, None
    try:
        while True:
            if part.have == size:
                part.sync()
                actual = part.digest.hexdigest()
                if actual == sha256:
                    break
                part.restart()
                bar.reset(total=size)
                mismatches += 1
                if mismatches > 1:
                    raise ShareError(
                        f"{file_path!r}: sha256 {actual} differs from the LFS pointer's {sha256} "
                        "twice in a row: the share holds other bytes than the pinned revision "
                        "says; nothing was put in place")
                continue
            before = part.have
            try:
                _get_range(http, _redirect(http, base, token, file_path), part, bar)
            except _Retry as error:
                last = error
                fails = 0 if part.have > before else fails + 1
                if fails >= attempts:
                    raise ShareError(
                        f"{file_path!r}: got {part.have} of {size} bytes; {attempts} tries in a "
                        f"row brought nothing (last: {last}); rerun to resume") from None
                if fails:
                    _backoff(fails, backoff)
    finally:
        bar.close()
