"""The weight downloader: one module for the control machine and the hosts.

Standard library only (Python 3.8 or newer), so a host without the Python stage runs it:

- on a host, the weights operation copies this file there and runs it with a job file,

      python3 fetch.py JOB.json [--attempts N] [--backoff SECONDS] [--lock-wait SECONDS]

  JOB.json: {"mode": "seafile" | "mirror", "source": share link or mirror folder URL,
  "folder": the share's folder, "model_dir", "stamps", "files": [{"name", "oid", "size"}]}.
  Each file, still an LFS pointer in the checkout, is downloaded next to it, verified, then
  renamed over the pointer, and the check is recorded in <model_dir>/<stamps>/<name>;
- on the control machine, operations/model.py imports it to fill its cache (download()
  with a progress callback drawing a bar).

Sources: a Seafile folder share (the file is found in the folder's listing, its size must
match the pointer, and each try asks `dl=1` for a fresh redirect to the fileserver, since
the access token in it expires), or a plain HTTP folder on the LAN (the mirror).

The rules, both sides:
  - a try that brings bytes resets the count of failed tries; `attempts` tries in a row
    without a byte give up, keeping the .partial file for the next run to resume (Range);
  - 5xx answers and broken connections are retried after a back-off; the fileserver's
    400/403/404 (a dead access token) through a fresh redirect;
  - seahub's 400/403/404, a page instead of a redirect, the mirror's 401/403/404/410 are
    final, and name the settings that chose the source;
  - a complete file whose sha256 differs is deleted and fetched once more from the start;
    a second mismatch is final;
  - a failed write (ENOSPC, EDQUOT, EFBIG or another error of the disk) is final at once,
    never retried; the .partial keeps what was written, for the rerun;
  - one download of a file at a time: an exclusive flock on a .lock file beside the
    .partial (a deploy killed while a download lives on, then a rerun; two deploys sharing
    a control cache), waited for `lock_wait` seconds, then an error naming the holder; the
    holder removes the lock file when it is done.

Speed: the body is read in BLOCK pieces into a few reused buffers (no copies), written at
once, and hashed on a worker thread (hashlib releases the GIL) so hashing overlaps the
reads where a core is free; on a host another thread fdatasyncs every FLUSH bytes, so the
fsync before the pointer is replaced has little left to do. In a process that gevent has
patched (pyinfra's), a started thread would be a greenlet on the hub, so the hashing goes
to gevent's pool of real threads instead. The control cache is not fsynced: the host hashes
every file again before it uses it.
"""

import collections
import errno
import fcntl
import hashlib
import http.client
import json
import os
import sys
import time
import _queue
import _thread
import urllib.error
import urllib.parse
import urllib.request

ATTEMPTS = 6
BACKOFF = 0.5  # seconds before the second try, doubled for each further one, at most 10
LOCK_WAIT = 10.0  # seconds to wait for another download of the same file to end
BLOCK = 1 << 20  # bytes of a read from the network and of a hash update
# Written in 16 KiB pieces: on Linux 6.x the size of a write into the page cache picks the
# size of the memory blocks that hold it, and larger blocks cost more to get on a busy or
# virtual machine (2 GiB written in 16 KiB pieces: 0.6-0.85 s in the kernel; in 32 KiB
# pieces 1.6-2.0 s, in 256 KiB 0.7-2.5 s, in 1 MiB 1.6-2.7 s). The 16 times as many write
# calls made no measurable difference to a 100 MiB download.
WRITE = 16 << 10
DEPTH = 4  # buffers in flight between the downloading thread and the hashing thread
FLUSH = 16 << 20  # bytes written between two background fdatasync calls
TIMEOUT = 60
PROGRESS_EVERY = 5.0  # seconds between two progress lines on a host
USER_AGENT = "chatglm-deploy-fetch/1"
SHARE_SETTINGS = "settings weights_share, seafile_url and weights_share_path choose the share"
MIRROR_SETTINGS = "setting weights_mirror"


def _greenlets() -> bool:
    """Whether gevent patched this process (threads would be greenlets on one OS thread)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


HASH_THREAD = True  # False: hash on the downloading thread


class Final(Exception):
    """Retrying cannot help; the message says what and why."""


class Retry(Exception):
    """A failure worth another try."""


class SourceError(Final):
    """The share or mirror itself is wrong; the message names the settings that chose it."""


class DiskError(Final):
    """Writing the downloaded bytes failed (disk full, quota, file size limit)."""


class Job:
    """A call queued on a Worker: done() without waiting, result() waits for it."""

    def __init__(self, fn, args):
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.running = _thread.allocate_lock()
        self.running.acquire()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as error:
            self.error = error
        finally:
            self.running.release()

    def done(self):
        return not self.running.locked()

    def result(self):
        with self.running:
            pass
        if self.error is not None:
            raise self.error
        return self.value


class Pooled:
    """A call queued on gevent's thread pool, with Job's done() and result()."""

    def __init__(self, result):
        self.async_result = result

    def done(self):
        return self.async_result.ready()

    def result(self):
        return self.async_result.get()


class Worker:
    """One thread running the calls submitted to it, in order. (concurrent.futures'
    ThreadPoolExecutor does the same; importing it took ~9 ms, 7% of a 100 MB download.)

    In a process gevent patched (pyinfra's, on the control machine) a started "thread" is a
    greenlet on the downloading OS thread, so the calls go to a pool of one real OS thread
    instead: hashlib and os.fdatasync release the GIL, so hashing overlaps with receiving."""

    def __init__(self):
        self.pool = None
        if _greenlets():
            from gevent.threadpool import ThreadPool

            self.pool = ThreadPool(1)
            return
        self.jobs = _queue.SimpleQueue()
        _thread.start_new_thread(self.serve, ())

    def serve(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job.run()

    def submit(self, fn, *args):
        if self.pool is not None:
            return Pooled(self.pool.spawn(fn, *args))
        job = Job(fn, args)
        self.jobs.put(job)
        return job

    def shutdown(self):
        """Stop once the calls queued so far have run (the caller waited for them)."""
        if self.pool is not None:
            self.pool.kill()
            return
        self.jobs.put(None)


def log(message):
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def say(message):
    """Progress, on stdout: the deploy shows these lines as they come (errors go to stderr)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return "%.1f %s" % (n, unit) if unit != "B" else "%d B" % n
        n /= 1024.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 302 surfaces as an HTTPError carrying its Location


OPENER = urllib.request.build_opener()
NO_REDIRECT = urllib.request.build_opener(_NoRedirect)


def request(url, headers=None, opener=OPENER):
    req = urllib.request.Request(url, headers=dict({"User-Agent": USER_AGENT}, **(headers or {})))
    return opener.open(req, timeout=TIMEOUT)


def error_text(error):
    try:
        body = error.read(300).decode("utf-8", "replace")
        return json.loads(body).get("error_msg", body).strip()
    except Exception:
        return ""


def backoff(fails, seconds):
    time.sleep(min(seconds * 2 ** (fails - 1), 10))


class Share:
    """A folder of a Seafile share link."""

    settings = SHARE_SETTINGS
    final_codes = ()  # from the fileserver, 400/403/404 mean a dead access token: retried

    def __init__(self, url, folder="/"):
        parsed = urllib.parse.urlsplit(url)
        parts = [p for p in parsed.path.split("/") if p]
        if len(parts) < 2 or parts[-2] != "d":
            raise SourceError("%r is not a Seafile folder share link (https://HOST/d/TOKEN/)" % url)
        self.url, self.folder = url, folder
        self.base, self.token = "%s://%s" % (parsed.scheme, parsed.netloc), parts[-1]
        self._listing = None

    def list(self, path, attempts=ATTEMPTS, pause=BACKOFF):
        """The dirent_list of a folder of the share (5xx and broken connections retried)."""
        url = "%s/api/v2.1/share-links/%s/dirents/?%s" % (
            self.base, self.token, urllib.parse.urlencode({"path": path}))
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                with request(url) as resp:
                    return json.loads(resp.read().decode("utf-8"))["dirent_list"]
            except urllib.error.HTTPError as error:
                last = "HTTP %d %s" % (error.code, error_text(error))
                if error.code < 500:
                    break
            except (OSError, ValueError, http.client.HTTPException) as error:
                last = "%s: %s" % (type(error).__name__, error)
            if attempt < attempts:
                backoff(attempt, pause)
        raise SourceError("listing %r of %s failed: %s" % (path, self.url, last))

    def find(self, name, size, attempts=ATTEMPTS, pause=BACKOFF):
        """The share's path of folder/name, checked against the pointer's size before any
        download (the folder is listed once)."""
        if self._listing is None:
            self._listing = dict((d.get("file_name"), d) for d in self.list(self.folder, attempts, pause)
                                 if not d.get("is_dir"))
        found = self._listing.get(os.path.basename(name))
        if found is None:
            raise SourceError("%r is not in folder %r of %s (it holds: %s)" % (
                os.path.basename(name), self.folder, self.url,
                ", ".join(sorted(self._listing)) or "no files"))
        if found.get("size") != size:
            raise SourceError("%s%s is %s bytes in the share but the LFS pointer says %d: the share "
                              "holds another version of the weights than the pinned model revision"
                              % (self.folder.rstrip("/") + "/", os.path.basename(name),
                                 found.get("size"), size))
        return found["file_path"]

    def url_of(self, file_path):
        """A fresh dl=1 redirect's target."""
        url = "%s/d/%s/files/?%s" % (self.base, self.token,
                                     urllib.parse.urlencode({"p": file_path, "dl": "1"}))
        try:
            with request(url, opener=NO_REDIRECT):
                pass
        except urllib.error.HTTPError as error:
            if error.code in (301, 302, 303, 307, 308) and error.headers.get("Location"):
                return urllib.parse.urljoin(url, error.headers["Location"])
            if error.code >= 500:
                raise Retry("dl=1 answered HTTP %d" % error.code)
            raise SourceError("%r: the share answered HTTP %d %s" % (
                file_path, error.code, error_text(error)))
        except (OSError, http.client.HTTPException) as error:
            raise Retry("dl=1: %s: %s" % (type(error).__name__, error))
        # Seafile answers a missing file (or a password form) with a page, not a redirect.
        raise SourceError("%r: the share answered a page instead of a download redirect: the "
                          "file does not exist there, or the share needs a password" % file_path)


class Mirror:
    """A plain HTTP folder holding the files."""

    settings = MIRROR_SETTINGS
    final_codes = (401, 403, 404, 410)

    def __init__(self, url):
        self.url = url

    def find(self, name, size, attempts=ATTEMPTS, pause=BACKOFF):
        return urllib.parse.urljoin(self.url, urllib.parse.quote(name))

    def url_of(self, path):
        return path


class Lock:
    """An exclusive flock on path for one download of a file at a time; waits up to `wait`
    seconds for another process holding it, then raises Final naming that process (its pid
    is written in the file). The holder removes the file before it lets go, so a lock taken
    on a file already removed is dropped and taken again on the new one."""

    def __init__(self, path, what, wait):
        self.path, self.what, self.wait, self.fd = path, what, wait, None

    def __enter__(self):
        deadline = time.monotonic() + self.wait
        said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except (BlockingIOError, InterruptedError):
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise Final("%s: another download of it is running (pid %s holds %s); "
                                    "wait for it to end, or stop it, and rerun" % (
                                        self.what, holder, self.path))
                    if not said:
                        log("%s: waiting up to %ds for another download of it (pid %s holds %s)"
                            % (self.what, self.wait, holder, self.path))
                        said = True
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
        os.pwrite(fd, ("%d\n" % os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)  # while still held: no lock file is left behind
        finally:
            os.close(self.fd)


class Partial:
    """The .partial file of a download and the sha256 of what it holds.

    append() writes a block at once and queues it for the hashing thread (or hashes it at
    once without HASH_THREAD); a buffer is handed out again only once its hash update is
    done; sync() waits for every queued update, so `digest` then covers exactly the `have`
    bytes written. With fsync, every FLUSH bytes are fdatasync'ed in the background and
    finish() fsyncs what is left.
    """

    def __init__(self, path, what, size, setting, fsync=True):
        self.path, self.what, self.size, self.setting = path, what, size, setting
        self.buffers = [memoryview(bytearray(BLOCK)) for _ in range(DEPTH)]
        self.hashing = collections.deque()  # queued hash updates, oldest first
        self.hasher = Worker() if HASH_THREAD else None
        self.flusher = Worker() if fsync and HASH_THREAD else None
        self.fsync = fsync
        self.flushing, self.flushed = None, 0
        self.fd, self.turn = None, 0
        self.digest, self.have = hashlib.sha256(), 0
        if os.path.exists(path) and os.path.getsize(path) <= size:
            with open(path, "rb") as f:
                while True:
                    n = f.readinto(self.buffers[0])
                    if not n:
                        break
                    self.digest.update(self.buffers[0][:n])
                    self.have += n
        elif os.path.exists(path):
            os.unlink(path)

    def buffer(self):
        """A free buffer of BLOCK bytes (waiting for the oldest hash update when all are queued)."""
        if len(self.hashing) == DEPTH:
            self.hashing.popleft().result()
        self.turn = (self.turn + 1) % DEPTH
        return self.buffers[self.turn]

    def sync(self):
        while self.hashing:
            self.hashing.popleft().result()

    def disk_error(self, error):
        folder = os.path.dirname(self.path)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = ("free space under %s (or set %s to a larger filesystem) and rerun: the "
                   "download resumes" % (folder, self.setting))
        else:
            fix = "check the disk under %s and rerun: the download resumes" % folder
        return DiskError("%s: %s while writing %s (%d of %d bytes written); %s" % (
            self.what, error.strerror or error, self.path, self.have, self.size, fix))

    def append(self, block):
        """Write block (a buffer from buffer()) to the file, then queue its hash update."""
        done = 0
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while done < len(block):
                written = os.write(self.fd, block[done:done + WRITE])
                self.have += written
                done += written
        except OSError as error:
            self.hash(block[:done])
            self.sync()
            raise self.disk_error(error)
        self.hash(block)
        if self.flusher is not None and self.have - self.flushed >= FLUSH:
            self.check_flush()
            if self.flushing is None:
                self.flushed = self.have
                self.flushing = self.flusher.submit(os.fdatasync, self.fd)

    def hash(self, block):
        if self.hasher is None:
            self.digest.update(block)
        else:
            self.hashing.append(self.hasher.submit(self.digest.update, block))

    def check_flush(self, wait=False):
        if self.flushing is not None and (wait or self.flushing.done()):
            flushing, self.flushing = self.flushing, None
            try:
                flushing.result()
            except OSError as error:
                raise self.disk_error(error)

    def finish(self):
        """Everything hashed, and on disk with fsync: before the file gets its name."""
        self.sync()
        self.check_flush(wait=True)
        try:
            if self.fd is not None and self.fsync:
                os.fsync(self.fd)
        except OSError as error:
            raise self.disk_error(error)

    def restart(self):
        self.sync()
        self.close_file()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.digest, self.have, self.flushed = hashlib.sha256(), 0, 0

    def close_file(self):
        if self.flushing is not None:
            flushing, self.flushing = self.flushing, None
            try:
                flushing.result()
            except OSError:
                pass
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError as error:  # a delayed write error (NFS, quota) shows up here
                raise self.disk_error(error)

    def close(self):
        """Release the file and the worker threads (the file itself stays)."""
        try:
            self.sync()
            self.close_file()
        finally:
            for worker in (self.hasher, self.flusher):
                if worker is not None:
                    worker.shutdown()


class Progress:
    """A line every few seconds: bytes, rate and time left (a host's progress)."""

    def __init__(self, name, size):
        self.name, self.size = name, size
        self.t0 = self.last = time.monotonic()
        self.start = None

    def __call__(self, have, final=False):
        now = time.monotonic()
        if self.start is None:
            self.start = have
        if not final and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        rate = (have - self.start) / max(now - self.t0, 1e-6)
        left = (self.size - have) / rate if rate > 0 else 0
        say("%s: %s of %s (%d%%), %s/s, ETA %dm%02ds" % (
            self.name, human(have), human(self.size), 100 * have // max(self.size, 1),
            human(rate), left // 60, left % 60))


def get_range(url, part, progress, final_codes):
    """Append what the server sends from part.have on; raise Retry or Final on failure."""
    start = part.have
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = "bytes=%d-" % start
    try:
        with request(url, headers) as resp:
            if resp.status == 200 and start:
                part.restart()  # the server ignored Range: start over rather than append twice
            elif resp.status == 206:
                expected = "bytes %d-%d/%d" % (start, part.size - 1, part.size)
                if resp.headers.get("Content-Range") != expected:
                    part.restart()
                    raise Retry("Content-Range %r, expected %r" % (
                        resp.headers.get("Content-Range"), expected))
            elif resp.status != 200:
                raise Retry("HTTP %d" % resp.status)
            while True:
                block = part.buffer()
                n = resp.readinto(block)
                if not n:
                    break
                if part.have + n > part.size:
                    part.restart()
                    raise Retry("the server sent more than the pointer's %d bytes" % part.size)
                part.append(block[:n])  # DiskError (Final) when the bytes cannot be written
                progress(part.have)
    except urllib.error.HTTPError as error:
        if error.code == 416:
            part.restart()
            raise Retry("HTTP 416: the partial file does not fit the file; starting over")
        if error.code in final_codes:
            raise SourceError("%s: the mirror answered HTTP %d" % (url, error.code))
        raise Retry("HTTP %d %s" % (error.code, error_text(error)))
    except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut
        raise Retry("%s: %s" % (type(error).__name__, error))
    if part.have < part.size:
        raise Retry("the connection closed after %d of %d bytes" % (part.have, part.size))


def check_free(folder, need, what, setting):
    """Raise DiskError when the filesystem of folder has less than need bytes available."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    stat = os.statvfs(probe)
    free = stat.f_bavail * stat.f_frsize  # what shutil.disk_usage reports
    if free < need:
        raise DiskError("%s: %.2f GB free under %s, %.2f GB needed; free some space (or set %s "
                        "to a larger filesystem) and rerun" % (what, free / 1e9, folder, need / 1e9,
                                                               setting))


def download(source, file_path, dest, oid, size, what, setting, done, hidden=True, fsync=True,
             attempts=ATTEMPTS, pause=BACKOFF, lock_wait=LOCK_WAIT, progress=None):
    """Fetch one file into dest, verified; resumes its .partial file.

    + source: a Share or a Mirror
    + file_path: what source.find() gave for the file
    + dest: where the verified file ends up (renamed there: same directory, atomic)
    + oid, size: the sha256 and size the LFS pointer gives
    + what: how messages name the download; setting: the setting that moves dest elsewhere
    + done: whether dest is already what it must be (asked once the lock is held: another
      process may have finished it meanwhile)
    + hidden: .<name>.partial/.lock beside dest (a model checkout) rather than <name>.partial
    + fsync: flush the file to disk before it gets its name
    + attempts: tries in a row without progress before giving up; pause: the first back-off
    + lock_wait: seconds to wait for another download of dest to end
    + progress: called with the bytes held after each block (and once more at the end)

    Returns False when done() said so once the lock was held, True when downloaded.
    """
    folder, base = os.path.split(dest)
    stem = os.path.join(folder, "." + base if hidden else base)
    os.makedirs(folder, exist_ok=True)
    with Lock(stem + ".lock", what, lock_wait):
        if done():
            return False
        part = Partial(stem + ".partial", what, size, setting, fsync)
        try:
            check_free(folder, size - part.have, what, setting)
            _fetch(source, file_path, part, oid, what, attempts, pause,
                   progress or (lambda have, final=False: None))
            part.finish()
        finally:
            part.close()
        os.replace(part.path, dest)
    return True


def _fetch(source, file_path, part, oid, what, attempts, pause, progress):
    size = part.size
    fails, mismatches, last = 0, 0, None
    while True:
        if part.have == size:
            part.sync()
            actual = part.digest.hexdigest()
            if actual == oid:
                break
            part.restart()
            mismatches += 1
            if mismatches > 1:
                raise Final("%s: sha256 %s differs from the LFS pointer's %s twice in a row: the "
                            "source holds other bytes than the pinned revision says; nothing was "
                            "put in place" % (what, actual, oid))
            log("%s: sha256 %s differs from the LFS pointer's %s; fetching it again"
                % (what, actual, oid))
            continue
        before = part.have
        try:
            get_range(source.url_of(file_path), part, progress, source.final_codes)
        except Retry as error:
            last = error
            fails = 0 if part.have > before else fails + 1
            log("%s: %s (at %d of %d bytes)" % (what, error, part.have, size))
            if fails >= attempts:
                raise Final("%s: got %d of %d bytes; %d tries in a row brought nothing (last: %s);"
                            " rerun to resume" % (what, part.have, size, attempts, last))
            if fails:
                backoff(fails, pause)
    progress(size, True)


# --- on a host -------------------------------------------------------------------------------


def verified(model_dir, stamps, name, oid, size):
    """The file is in place and its check recorded (by another run, while we waited)."""
    dest = os.path.join(model_dir, name)
    try:
        with open(os.path.join(model_dir, stamps, name)) as f:
            return f.read().strip() == oid and os.path.getsize(dest) == size
    except OSError:
        return False


def write_stamp(model_dir, stamps, name, oid):
    stamp = os.path.join(model_dir, stamps, name)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp + ".tmp", "w") as f:
        f.write(oid + "\n")
    os.replace(stamp + ".tmp", stamp)


def run_job(job, attempts, pause, lock_wait):
    """Every file of a job in place and verified; raises Final (or OSError)."""
    model_dir, stamps, files = job["model_dir"], job["stamps"], job["files"]
    need = 0
    for entry in files:
        partial = os.path.join(model_dir, os.path.dirname(entry["name"]),
                               "." + os.path.basename(entry["name"]) + ".partial")
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        need += max(entry["size"] - have, 0)
    stat = os.statvfs(model_dir)
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise Final("%s: %.2f GB free, %.2f GB needed for the weights; free some space and "
                    "rerun" % (model_dir, free / 1e9, need / 1e9))
    source = (Mirror(job["source"]) if job["mode"] == "mirror"
              else Share(job["source"], job["folder"]))
    for entry in files:
        name, oid, size = entry["name"], entry["oid"], entry["size"]
        path = source.find(name, size, attempts, pause)
        if not download(source, path, os.path.join(model_dir, name), oid, size, name,
                        "install_dir", lambda: verified(model_dir, stamps, name, oid, size),
                        attempts=attempts, pause=pause, lock_wait=lock_wait,
                        progress=Progress(name, size)):
            log("%s: verified by another run meanwhile" % name)
            continue
        write_stamp(model_dir, stamps, name, oid)
        log("%s: verified (sha256 %s, %d bytes)" % (name, oid, size))


class Options:
    """The command line: JOB.json [--attempts N] [--backoff SECONDS] [--lock-wait SECONDS].
    (Read by hand: importing argparse took ~4 ms of a 0.13 s download.)"""

    KINDS = {"attempts": int, "backoff": float, "lock_wait": float}
    USAGE = ("usage: fetch.py JOB.json [--attempts N] [--backoff SECONDS] [--lock-wait SECONDS]\n"
             "Fetch and verify the weight files JOB.json lists")

    def __init__(self, argv):
        self.job, self.attempts, self.backoff, self.lock_wait = None, None, BACKOFF, LOCK_WAIT
        args = list(argv)
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                print(self.USAGE)
                sys.exit(0)
            if not arg.startswith("--") and self.job is None:
                self.job = arg
                continue
            name, given, value = arg.partition("=")
            key = name[2:].replace("-", "_") if name.startswith("--") else ""
            if key not in self.KINDS:
                self.fail("unrecognized argument %s" % arg)
            if not given:
                if not args:
                    self.fail("argument %s: expected a value" % name)
                value = args.pop(0)
            try:
                setattr(self, key, self.KINDS[key](value))
            except ValueError:
                self.fail("argument %s: invalid %s value: %r" % (name, self.KINDS[key].__name__, value))
        if self.job is None:
            self.fail("the job file is missing")

    def fail(self, message):
        print("%s\nfetch.py: error: %s" % (self.USAGE, message), file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = Options(sys.argv[1:] if argv is None else argv)
    try:
        with open(args.job) as f:
            job = json.load(f)
    except (OSError, ValueError) as error:
        log("ERROR: the job file %s cannot be read: %s" % (args.job, error))
        return 2
    try:
        attempts = args.attempts or job.get("attempts", ATTEMPTS)
        run_job(job, attempts, args.backoff, args.lock_wait)
    except SourceError as error:
        log("ERROR: %s (%s)" % (error, MIRROR_SETTINGS if job["mode"] == "mirror" else SHARE_SETTINGS))
        return 1
    except Final as error:
        log("ERROR: %s" % error)
        return 1
    except OSError as error:  # the stamp, the rename: the disk, not the download
        log("ERROR: %s; fix it and rerun: the download resumes" % error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
