"""Control-side checks of the inventory: SSH keys, pinned revisions, every upstream source a
host will fetch from, unreachable hosts. They run while deploy.py collects operations, so a
bad value stops the run before any host is changed.

pyinfra collects hosts in parallel greenlets, and several hosts share one control-side
cache: every check here runs under one lock, one at a time, and each distinct check runs
once per run. A check that touches the cache also holds a file lock on it, so two deploys
started from this machine at once do not fetch into the same repository either.
"""

import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import requests
from gevent.lock import Semaphore
from pyinfra import logger

from runtime import fetch

from .pyplan import PythonPlan
from .settings import SettingError, is_commit

# Answers of upload-pack (git daemon, GitHub, Hugging Face) for a commit the remote lacks.
UNKNOWN_COMMIT = ("not our ref", "couldn't find remote ref", "no such remote ref",
                  "unadvertised object", "not a valid object", "bad object")
POINTER = re.compile(r"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\n"
                     r"size (\d+)\n?")
PYPI = "https://pypi.org/simple/"  # where pip looks when pip_index_url is unset
TIMEOUT = (10, 30)  # seconds to connect / between bytes of one check's answer
_guard = Semaphore()
_done: dict = {}


def check_ssh_keys(*groups) -> None:
    """Called at the end of an inventory file with its host lists: a host whose ssh_key names
    no file stops the run before pyinfra connects anywhere (pyinfra itself would stop with
    a traceback that names neither the host nor the setting)."""
    for group in groups:
        for name, data in group:
            key = (data or {}).get("ssh_key")
            if key and not Path(os.path.expanduser(str(key))).is_file():
                raise SettingError(name, "ssh_key", f"= {str(key)!r} names no file on this "
                                   "machine", "point ssh_key at the private key the host "
                                   "accepts, or drop it to use the SSH agent / ~/.ssh defaults")


def _once(key, check):
    """check() once per key for the whole run, one check at a time. A SettingError is not
    kept: the run stops at the first one anyway."""
    with _guard:
        if key not in _done:
            _done[key] = check()
        return _done[key]


@contextmanager
def _cache_lock(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "upstream.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _git(repo: Path, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _repo(cache: Path, url: str) -> Path:
    """A bare repo per remote: fetches from different remotes never share shallow files or
    partial-clone settings."""
    return cache / "remotes" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")


def check_revision(host_name: str, setting: str, url: str, revision: str, cache: Path,
                   pointers: bool = False) -> str | dict:
    """Make sure the remote at url has commit revision, fetching just that commit into a
    control-side bare repo (a commit found once is not asked for again).

    + pointers: also read the commit's LFS pointer files ({name: {oid, size}}) and return
      them instead of '' (the model repos: the share is checked against them)

    Returns ''/the pointers when the remote has it, or a warning (str) when the remote could
    not be asked (the host's clone reports it then); raises SettingError when the remote
    answers that it lacks the commit.
    """
    return _once(("revision", url, revision, pointers),
                 lambda: _check_revision(host_name, setting, url, revision, cache, pointers))


def _check_revision(host_name, setting, url, revision, cache, pointers):
    known = cache / "pointers" / f"{revision}.json" if pointers else cache / "revisions.confirmed"
    line = f"{revision} {url}"
    try:
        if pointers:
            return json.loads(known.read_text())
        if line in known.read_text().splitlines():
            return ""
    except (OSError, ValueError):
        pass
    try:
        with _cache_lock(cache):
            answer = _fetch(host_name, setting, url, revision, _repo(cache, url), pointers)
    except OSError as error:
        return (f"could not check {revision[:12]} of {url}: {cache} is not usable ({error}); "
                "the host's clone checks it")
    if isinstance(answer, str) and answer:
        return answer
    try:  # only saves the next run a look
        known.parent.mkdir(parents=True, exist_ok=True)
        if pointers:
            tmp = known.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(answer))
            tmp.replace(known)
        else:
            with known.open("a") as f:
                f.write(line + "\n")
    except OSError:
        pass
    return answer


def _fetch(host_name, setting, url, revision, repo, pointers):
    if not (repo / "HEAD").exists():
        init = subprocess.run(["git", "init", "-q", "--bare", str(repo)], capture_output=True,
                              text=True)
        if init.returncode:
            return (f"could not check {revision[:12]} of {url}: no git repo at {repo} "
                    f"({init.stderr.strip()}); the host's clone checks it")
    if _git(repo, "cat-file", "-e", f"{revision}^{{commit}}").returncode:
        # The code repo needs only the commit; a model repo's pointer files are a few KB.
        only = [] if pointers else ["--filter=blob:none"]
        try:
            fetch = _git(repo, "fetch", "-q", "--no-tags", "--depth", "1", *only, url, revision)
            answer, ok = fetch.stderr, fetch.returncode == 0
        except subprocess.TimeoutExpired:
            answer, ok = "no answer in 120 s", False
        if not ok:
            if any(mark in answer.lower() for mark in UNKNOWN_COMMIT):
                raise SettingError(host_name, setting, f"= {revision!r}: {url} has no such commit",
                                   f"pin a commit the remote has (git ls-remote {url}; "
                                   "git log on a clone of it)")
            last = [line for line in answer.splitlines() if line.strip()][-1:] or ["?"]
            return (f"could not ask {url} for {revision[:12]} from this machine "
                    f"({last[0].strip()}); the host's clone checks it")
    return _read_pointers(repo, revision) if pointers else ""


def _read_pointers(repo: Path, revision: str) -> dict:
    """{path: {oid, size}} of the files of a commit that are LFS pointers."""
    tree = _git(repo, "-c", "core.quotePath=false", "ls-tree", "-r", "-l", revision).stdout
    small = {}
    for row in tree.splitlines():
        meta, _, path = row.partition("\t")
        _, kind, blob, size = meta.split()
        if kind == "blob" and size.isdigit() and int(size) < 512:
            small[blob] = path
    if not small:
        return {}
    batch = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch"], capture_output=True,
                           input="\n".join(small) + "\n", text=True).stdout
    found, rest = {}, batch
    while rest:
        header, _, rest = rest.partition("\n")
        blob, _, size = header.split(" ")
        body, rest = rest[:int(size)], rest[int(size) + 1:]
        match = POINTER.fullmatch(body)
        if match:
            found[small[blob]] = {"oid": match[1], "size": int(match[2])}
    return found


def check_share(host_name: str, settings: dict, share: str, folder: str, pointers: dict,
                reviewed: dict) -> None:
    """The share link resolves, its folder lists every weight file with the size its LFS
    pointer gives, and at a default revision the pointers name the reviewed sha256.

    + settings: the setting names that gave share, folder and the model revision
    + pointers: {name: {oid, size}} of the pinned commit ({} when the remote was not asked)
    + reviewed: {name: sha256} published for the pinned commit (data/models.toml)
    """
    for name, sha in reviewed.items():
        if name in pointers and pointers[name]["oid"] != sha:
            raise SettingError(host_name, settings["model_revision"], f"gives {name} the sha256 "
                               f"{pointers[name]['oid']}, not the reviewed {sha}",
                               "check model_url: at this commit the upstream repo holds the "
                               "reviewed weights")
    listing = _once(("share", share, folder), lambda: _list_share(host_name, settings, share, folder))
    for name, want in sorted(pointers.items()):
        entry = listing.get(name)
        if entry is None:
            raise SettingError(host_name, settings["folder"], f"= {folder!r}: the share's folder "
                               f"has no {name} (it holds: {', '.join(sorted(listing)) or 'no files'})",
                               f"point {settings['folder']} (or {settings['share']}) at the "
                               "folder that holds this model's weight files")
        if entry["size"] != want["size"]:
            raise SettingError(host_name, settings["share"], f"holds {folder.rstrip('/')}/{name} "
                               f"of {entry['size']} bytes, but the LFS pointer at the pinned "
                               f"revision says {want['size']}",
                               f"use the share of the weights of that revision, or pin the "
                               f"revision ({settings['model_revision']}) those weights belong to")


def _list_share(host_name, settings, share, folder) -> dict:
    try:
        source = fetch.Share(share)
        source.list("/", attempts=2)
    except fetch.Final as error:
        raise SettingError(host_name, settings["share"], f"= {share!r} does not answer as a "
                           f"Seafile share link: {error}",
                           "copy the share link (https://HOST/d/TOKEN/) of the weights again, "
                           "or set check_sources=False if only the hosts can reach it") from None
    try:
        entries = source.list(folder, attempts=2)
    except fetch.Final as error:
        raise SettingError(host_name, settings["folder"], f"= {folder!r} is not a folder of "
                           f"{share}: {error}",
                           "name the share's folder that holds the weight files") from None
    return {d["file_name"]: d for d in entries if not d.get("is_dir") and "file_name" in d}


def check_mirror(host_name: str, mirror: str, pointers: dict) -> None:
    """Every weight file answers at the LAN mirror with the size of its pointer."""
    for name, want in sorted(pointers.items()):
        url = mirror + name
        size = _once(("head", url), lambda: _head(host_name, "weights_mirror", url))
        if size is not None and size != want["size"]:
            raise SettingError(host_name, "weights_mirror", f"serves {url} with {size} bytes, "
                               f"but the LFS pointer at the pinned revision says {want['size']}",
                               "put the weights of the pinned revision on the mirror")


def check_url(host_name: str, setting: str, url: str, must_list: str = "") -> None:
    """url answers 200 (after redirects); with must_list, its page names that file prefix
    (an index page: the pinned release is on it)."""
    _once(("get", url, must_list), lambda: _get(host_name, setting, url, must_list))


def _answer(host_name, setting, url, method, **kwargs) -> requests.Response:
    try:
        resp = requests.request(method, url, timeout=TIMEOUT, allow_redirects=True, **kwargs)
    except requests.RequestException as error:
        raise SettingError(host_name, setting, f"leads to {url}, which cannot be reached from "
                           f"this machine ({type(error).__name__}: {error})",
                           f"correct {setting}, or set check_sources=False if only the hosts "
                           "can reach it") from None
    if resp.status_code != 200:
        raise SettingError(host_name, setting, f"leads to {url}, which answers HTTP "
                           f"{resp.status_code}",
                           f"correct {setting} so that it serves this file or index")
    return resp


def _head(host_name, setting, url) -> int | None:
    resp = _answer(host_name, setting, url, "HEAD")
    size = resp.headers.get("Content-Length")
    return int(size) if size and size.isdigit() else None


def _get(host_name, setting, url, must_list):
    if not must_list:
        _answer(host_name, setting, url, "HEAD")
        return
    page = _answer(host_name, setting, url, "GET").text
    names = {must_list, must_list.replace("+", "%2B")}
    if not any(name in page for name in names):
        raise SettingError(host_name, setting, f"leads to {url}, whose page lists no {must_list}",
                           f"point {setting} at an index that serves it")


def check_sources(host_name: str, s, src: dict | None, py: PythonPlan | None) -> None:
    """Every upstream one host will fetch from, asked from this machine: the pinned commits
    (check_revisions), the weights' share or mirror against the model commit's LFS pointers,
    the conda installer, the pip index and the torch index (check_sources).

    + s: the host's Settings
    + src: the variant's sources (settings.source_for), None when the model stage is off
    + py: the host's Python plan, None when the Python stage is off
    """
    cache = Path(s.weights_cache).expanduser()
    pointers = {}
    if src and s.check_revisions:
        for key, url, want_pointers in (("code_revision", src["code_url"], False),
                                        ("model_revision", src["model_url"], True)):
            if not is_commit(src[key]):
                continue  # a floating ref is resolved on the host
            answer = check_revision(host_name, src["settings"][key], url, src[key], cache,
                                    pointers=want_pointers)
            if isinstance(answer, str):
                if answer:
                    logger.warning(f"[{host_name}] {answer}")
            else:
                pointers = answer
    if not s.check_sources:
        return
    if src and "mirror" in src and s.weights_mode == "mirror":
        check_mirror(host_name, src["mirror"], pointers)
    elif src:
        check_share(host_name, src["settings"], src["share"], src["share_path"], pointers,
                    src["reviewed"])
    if not py:
        return
    if py.conda:
        setting = "conda_installer_url" if s.conda_installer_url else "conda_installer_url (data/python.toml)"
        check_url(host_name, setting, py.conda.url)
    if py.torch:
        setting = "torch_index_url" if s.torch_index_url else "torch_index_url (data/python.toml)"
        check_url(host_name, setting, py.torch_index.rstrip("/") + "/torch/",
                  f"torch-{py.torch if py.torch_tag != 'cpu' else py.torch.split('+')[0]}")
    transformers = py.pins.get("transformers")
    if transformers:
        index = py.index or PYPI
        setting = "pip_index_url" if s.pip_index_url else "pip_index_url (PyPI)"
        check_url(host_name, setting, index.rstrip("/") + "/transformers/",
                  f"transformers-{transformers}")


def unreachable_reason(host) -> str:
    """Why pyinfra could not connect to host: whether its SSH port answers at all, and
    whether it answers with the host key the inventory's known-hosts file has for it."""
    address = host.data.get("ssh_hostname") or host.name
    port = int(host.data.get("ssh_port") or 22)
    try:
        with socket.create_connection((address, port), timeout=3):
            pass
    except OSError as error:
        return f"no SSH at {address}:{port}: {error.strerror or error}"
    known = Path(os.path.expanduser(str(host.data.get("ssh_known_hosts_file")
                                        or "~/.ssh/known_hosts")))
    strict = str(host.data.get("ssh_strict_host_key_checking") or "accept-new").lower()
    problem = host_key_problem(address, port, known, strict == "yes")
    return problem or f"SSH at {address}:{port} answers, but the login failed (see the log above)"


def fingerprint(key) -> str:
    """A host key's fingerprint as OpenSSH prints it (SHA256:<base64, no padding>)."""
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def host_key_problem(address: str, port: int, known: Path, strict: bool) -> str:
    """'' unless the host's key differs from the one known for it (or, with strict
    checking, none is known): then what differs and the fix, for the inventory's file."""
    import paramiko

    name = address if port == 22 else f"[{address}]:{port}"
    keys = paramiko.HostKeys()
    try:
        keys.load(str(known))
    except (OSError, paramiko.SSHException):
        pass
    entry = keys.lookup(name)
    add = f"ssh-keyscan -p {port} {address} >> {known}"
    if not entry:
        if not strict:
            return ""
        return (f"SSH at {address}:{port} answers, but {known} (the inventory's "
                f"ssh_known_hosts_file) has no host key for {name}. Fix: check the host's key "
                f"fingerprint and add it: {add}")
    try:
        with socket.create_connection((address, port), timeout=5) as sock:
            transport = paramiko.Transport(sock)
            try:
                options = transport.get_security_options()
                wanted = [t for t in options.key_types if t in entry.keys()]
                if wanted:
                    options.key_types = wanted  # the key type the file knows, as ssh asks for
                transport.start_client(timeout=5)
                offered = transport.get_remote_server_key()
            finally:
                transport.close()
    except (OSError, paramiko.SSHException, EOFError):
        return ""
    have = entry.get(offered.get_name())
    if have is None or have == offered:
        return ""
    return (f"the host key of {name} changed: it offers {offered.get_name()} "
            f"{fingerprint(offered)}, {known} (the inventory's ssh_known_hosts_file) has "
            f"{fingerprint(have)} (the host was reinstalled, or something is in between). Fix: if "
            f"the host was reinstalled, ssh-keygen -R '{name}' -f {known}, then add its new key "
            f"after checking its fingerprint: {add}")
