"""Client for Seafile share links (the Tsinghua cloud), run on the control machine.

List a shared folder through the dirents API, download a file through the
`dl=1` redirect, resume with Range after a break (asking for a fresh redirect,
since the access token in it expires), and verify sha256 and size while the
bytes stream past. A file is only ever renamed into place once verified.
"""

import hashlib
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm import tqdm

CHUNK = 1 << 20
ATTEMPTS = 6


class ShareError(Exception):
    """The share cannot give us the file; the message says what and why."""


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


def list_folder(share_url: str, path: str = "/", session=None) -> list[dict]:
    """The dirent_list of a folder of the share."""
    base, token = parse_share(share_url)
    http = session or requests
    resp = http.get(f"{base}/api/v2.1/share-links/{token}/dirents/",
                    params={"path": path}, timeout=30)
    if resp.status_code != 200:
        raise ShareError(f"listing {path!r} of {share_url} failed: HTTP {resp.status_code} "
                         f"{_error(resp)}")
    return resp.json()["dirent_list"]


def _redirect(http, base, token, file_path) -> str:
    resp = http.get(f"{base}/d/{token}/files/", params={"p": file_path, "dl": "1"},
                    allow_redirects=False, timeout=30)
    if resp.status_code in (301, 302, 303, 307, 308):
        return requests.compat.urljoin(resp.url, resp.headers["Location"])
    if resp.status_code == 200:
        # Seafile answers a missing file (or a password form) with a page, not a redirect.
        raise ShareError(f"{file_path!r}: the share answered a page instead of a download "
                         "redirect: the file does not exist there, or the share needs a password")
    if resp.status_code in (400, 403, 404):
        raise ShareError(f"{file_path!r}: the share answered HTTP {resp.status_code} "
                         f"{_error(resp)}")
    raise ConnectionError(f"dl=1 for {file_path!r} answered HTTP {resp.status_code}")


def download(share_url: str, file_path: str, dest: Path, sha256: str, size: int,
             progress: bool = True, session=None) -> Path:
    """Fetch one file of the share into dest, verified; resumes dest's .partial file.

    + share_url: the folder share link
    + file_path: the file's path inside the share ('/chatglm-6b-int4/pytorch_model.bin')
    + dest: where the verified file ends up
    + sha256, size: what the LFS pointer says the file must be
    """
    base, token = parse_share(share_url)
    http = session or requests.Session()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    have = 0
    if partial.exists():
        if partial.stat().st_size > size:
            partial.unlink()
        else:
            with open(partial, "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
            have = partial.stat().st_size

    bar = tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=Path(file_path).name, disable=not progress, leave=False)
    last_error = None
    try:
        for attempt in range(ATTEMPTS):
            if have == size:
                break
            try:
                url = _redirect(http, base, token, file_path)
                headers = {"Range": f"bytes={have}-"} if have else {}
                with http.get(url, headers=headers, stream=True, timeout=60) as resp:
                    if resp.status_code == 200 and have:
                        # The server ignored Range: start over rather than append twice.
                        have, digest = 0, hashlib.sha256()
                        bar.reset(total=size)
                    elif resp.status_code not in (200, 206):
                        raise ConnectionError(f"HTTP {resp.status_code} {_error(resp)}")
                    with open(partial, "ab" if have else "wb") as out:
                        for block in resp.iter_content(CHUNK):
                            out.write(block)
                            digest.update(block)
                            have += len(block)
                            bar.update(len(block))
                            if have > size:
                                break
                if have > size:
                    partial.unlink()
                    raise ShareError(f"{file_path!r} is larger than the pointer's {size} bytes")
            except (requests.RequestException, ConnectionError) as e:
                last_error = e
                time.sleep(min(2 ** attempt * 0.2, 5))
    finally:
        bar.close()

    if have != size:
        raise ShareError(f"{file_path!r}: got {have} of {size} bytes after {ATTEMPTS} attempts "
                         f"(last error: {last_error}); rerun to resume")
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ShareError(f"{file_path!r}: sha256 {digest.hexdigest()} does not match the LFS "
                         f"pointer's {sha256}; the partial file was deleted, rerun to fetch again")
    partial.replace(dest)
    return dest
