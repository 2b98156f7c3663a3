"""Control-side checks of the inventory that need no host: SSH keys, pinned revisions,
unreachable hosts. They run while deploy.py collects operations, so a bad value stops the
run before any host is changed.
"""

import os
import socket
import subprocess
from pathlib import Path

from gevent.lock import Semaphore

from .settings import SettingError

# Answers of upload-pack (git daemon, GitHub, Hugging Face) for a commit the remote lacks.
UNKNOWN_COMMIT = ("not our ref", "couldn't find remote ref", "no such remote ref",
                  "unadvertised object", "not a valid object", "bad object")
_known: dict[tuple[str, str], str] = {}
_locks: dict[tuple[str, str], Semaphore] = {}


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


def check_revision(host_name: str, setting: str, url: str, revision: str, cache: Path) -> str:
    """Make sure the remote at url has commit revision, fetching just that commit into a
    control-side bare repo (the cache: a commit found once is not asked for again).

    Returns '' when the remote has it, or a warning when the remote could not be asked (the
    host's clone reports it then); raises SettingError when the remote answers it lacks it.
    """
    key = (url, revision)
    with _lock(key):  # hosts are collected in parallel: one check per commit, not per host
        if key not in _known:
            _known[key] = _check(host_name, setting, url, revision, cache)
        return _known[key]


def _lock(key) -> Semaphore:
    return _locks.setdefault(key, Semaphore())


def _confirmed(cache: Path) -> Path:
    """Where the (url, commit) pairs already found on their remotes are listed, so that a
    later run asks neither the remote nor git."""
    return cache / "revisions.confirmed"


def _check(host_name: str, setting: str, url: str, revision: str, cache: Path) -> str:
    confirmed = _confirmed(cache)
    line = f"{revision} {url}"
    try:
        if line in confirmed.read_text().splitlines():
            return ""
    except OSError:
        pass
    answer = _ask(host_name, setting, url, revision, cache)
    if answer == "":
        try:
            with confirmed.open("a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # only saves the next run a look
    return answer


def _ask(host_name: str, setting: str, url: str, revision: str, cache: Path) -> str:
    repo = cache / "revisions.git"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    if not (repo / "HEAD").exists():
        try:
            repo.mkdir(parents=True, exist_ok=True)
            init = subprocess.run(["git", "init", "-q", "--bare", str(repo)], env=env,
                                  capture_output=True, text=True)
            problem = init.stderr.strip().splitlines()[-1:] if init.returncode else []
        except OSError as error:
            problem = [str(error)]
        if problem:
            return (f"could not check {revision[:12]} of {url}: no git repo at {repo} "
                    f"({problem[0]}); the host's clone checks it")
    have = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{revision}^{{commit}}"],
                          capture_output=True, env=env)
    if have.returncode == 0:
        return ""
    try:
        fetch = subprocess.run(
            ["git", "-C", str(repo), "fetch", "-q", "--no-tags", "--depth", "1",
             "--filter=blob:none", url, revision],
            capture_output=True, text=True, env=env, timeout=120)
        answer, ok = fetch.stderr, fetch.returncode == 0
    except subprocess.TimeoutExpired:
        answer, ok = "no answer in 120 s", False
    if ok:
        return ""
    if any(mark in answer.lower() for mark in UNKNOWN_COMMIT):
        raise SettingError(host_name, setting, f"= {revision!r}: {url} has no such commit",
                           f"pin a commit the remote has (git ls-remote {url}; "
                           "git log on a clone of it)")
    last = [line for line in answer.splitlines() if line.strip()][-1:] or ["?"]
    return (f"could not ask {url} for {revision[:12]} from this machine "
            f"({last[0].strip()}); the host's clone checks it")


def unreachable_reason(host) -> str:
    """Why pyinfra could not connect to host: whether its SSH port answers at all."""
    address = host.data.get("ssh_hostname") or host.name
    port = int(host.data.get("ssh_port") or 22)
    try:
        with socket.create_connection((address, port), timeout=3):
            return f"SSH at {address}:{port} answers, but the login failed (see the log above)"
    except OSError as error:
        return f"no SSH at {address}:{port}: {error.strerror or error}"
