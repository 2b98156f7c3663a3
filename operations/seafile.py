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
    more from the start; a second mismatch is final.
"""

import hashlib
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm import tqdm

CHUNK = 1 << 20
# Bytes of a read from the network: a broken connection loses at most one read, since
# urllib3 drops a short read's bytes when it raises.
READ = 64 << 10
ATTEMPTS = 6
BACKOFF = 0.5  # seconds before the second try, doubled for each further one, at most 10
TIMEOUT = (30, 60)


class ShareError(Exception):
    """The share cannot give us the file; the message says what and why."""


class _Retry(Exception):
    """A failure worth another try."""


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
    """The .partial file of a download and the sha256 of what it holds."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.digest, self.have = hashlib.sha256(), 0
        if path.exists() and path.stat().st_size <= size:
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    self.digest.update(block)
                    self.have += len(block)
        else:
            self.restart()

    def restart(self):
        self.path.unlink(missing_ok=True)
        self.digest, self.have = hashlib.sha256(), 0


def _get_range(http, url: str, part: _Partial, bar) -> None:
    """Append what the fileserver sends from part.have on; raise _Retry on any failure."""
    start = part.have
    headers = {"Range": f"bytes={start}-"} if start else {}
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
            with open(part.path, "ab") as out:
                for block in resp.iter_content(READ):
                    if part.have + len(block) > part.size:
                        part.restart()
                        raise _Retry(f"the server sent more than the pointer's {part.size} bytes")
                    out.write(block)
                    part.digest.update(block)
                    part.have += len(block)
                    bar.update(len(block))
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
             backoff: float = BACKOFF) -> Path:
    """Fetch one file of the share into dest, verified; resumes dest's .partial file.

    + share_url: the folder share link
    + file_path: the file's path inside the share ('/chatglm-6b-int4/pytorch_model.bin')
    + dest: where the verified file ends up
    + sha256, size: what the LFS pointer says the file must be
    + attempts: tries in a row without progress before giving up
    + backoff: seconds to wait after the first failed try (doubled after each further one)
    """
    base, token = parse_share(share_url)
    http = session or requests.Session()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Partial(dest.with_name(dest.name + ".partial"), size)
    check_free(dest.parent, size - part.have, "the control cache")
    bar = tqdm(total=size, initial=part.have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=Path(file_path).name, disable=not progress, leave=False)
    fails, mismatches, last = 0, 0, None
    try:
        while True:
            if part.have == size:
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
    part.path.replace(dest)
    return dest
