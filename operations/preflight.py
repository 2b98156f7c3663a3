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
