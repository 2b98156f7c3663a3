"""One deploy at a time per host: a lock taken by the run's first command on the host and
held until the run lets go of the host.

Why an flock held by a process tied to the SSH connection (and not a lease file): a lease
has to be refreshed while pip or a download runs for minutes, from a control machine
that is busy doing just that, and a crashed run leaves it until it expires. An flock is
kernel state: it is held exactly while the holder process lives, and the holder lives
exactly while this run's SSH connection does (it watches the connection's sshd process).
The deploy killed (even SIGKILL), the control machine gone, the connection dropped: the
holder exits within a second and the lock is free; nothing is left to clean up. The file
under /run/lock (a tmpfs: empty after a reboot) only says who holds the lock, for the
message a second run prints.

The lock is taken by the command that reads the host's prefetched facts (see
operations/factcache.py), so that every fact of the run is read under it: what another
run did before this one got the lock is seen, and it costs no command of its own.
"""

import datetime
import re
import secrets
import shlex
import socket

from pyinfra import host
from pyinfra.api import BaseStateCallback, operation

from . import runstate
from .common import fail

LOCK = "/run/lock/chatglm-deploy.lock"
MARK = "@@chatglm-lock"
# Processes between the command's shell and what owns the connection, walked past on
# the way up (sudo/su when a deploy uses them).
SHELLS = "sh|bash|dash|sudo|su|env|setsid|flock|timeout"


def run_info(state) -> dict:
    """This run's id, start time and control host (once per run)."""
    run = runstate.of(state)
    if run.info is None:
        run.info = {
            "run": secrets.token_hex(4),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "from": socket.gethostname() or "?",
        }
    return run.info


def take_command(info: dict, path: str = LOCK) -> str:
    """Shell that takes the lock and prints one line: `MARK taken <holder pid>`, `MARK busy
    <what the lock file says>` or `MARK error <why>`. Never exits the calling shell.

    The holder keeps fd 9 (the flock) and watches the connection's owner: the first
    process above this command that is no shell (sshd's process for this connection; with
    @local, pyinfra itself)."""
    p = shlex.quote(path)
    line = shlex.quote(f"run={info['run']} started={info['started']} from={info['from']}")
    return (
        f"( L={p}; [ -d \"${{L%/*}}\" ] || mkdir -p \"${{L%/*}}\" 2>/dev/null; "
        # `command`: a failing redirection of exec must not end the shell (POSIX special builtin)
        f"if ! {{ command exec 9<>\"$L\"; }} 2>/dev/null; then echo '{MARK} error cannot open '\"$L\"; exit 0; fi; "
        # -w 2, not -n: a --dry run's probe holds a shared lock for an instant.
        f"if ! flock -x -w 2 9; then printf '{MARK} busy %s\\n' \"$(head -c 400 \"$L\" | tr '\\n' ' ')\"; exit 0; fi; "
        "p=$$; owner=; "
        "while [ \"$p\" -gt 1 ] 2>/dev/null; do "
        "{ read -r c < /proc/$p/comm; } 2>/dev/null || break; "
        f"case $c in {SHELLS}) ;; *) owner=$p; break;; esac; "
        "{ read -r s < /proc/$p/stat; } 2>/dev/null || break; s=${s##*) }; set -- $s; p=$2; done; "
        f"[ -n \"$owner\" ] || {{ echo '{MARK} error no process owns this connection'; exit 0; }}; "
        # (a zombie is gone too: its parent may reap it late)
        "setsid sh -c 'while { read -r s < /proc/$0/stat; } 2>/dev/null && s=${s##*) } && [ \"${s%% *}\" != Z ]; "
        "do sleep 1 9>&-; done' \"$owner\" </dev/null >/dev/null 2>&1 & "
        f"h=$!; printf '%s pid=%s\\n' {line} \"$h\" > \"$L\"; echo \"{MARK} taken $h\" )"
    )


def check_command(path: str = LOCK) -> str:
    """Shell for --dry: whether another run holds the lock, writing nothing (a shared flock
    for an instant, on the file only if it exists)."""
    p = shlex.quote(path)
    return (
        f"( L={p}; [ -e \"$L\" ] || {{ echo '{MARK} free'; exit 0; }}; "
        f"if ! {{ command exec 9<\"$L\"; }} 2>/dev/null; then echo '{MARK} free'; exit 0; fi; "
        f"if flock -s -n 9; then echo '{MARK} free'; "
        f"else printf '{MARK} busy %s\\n' \"$(head -c 400 \"$L\" | tr '\\n' ' ')\"; fi )"
    )


def parse(lines: list[str]) -> dict:
    """{"state": "taken" | "busy" | "free" | "error" | "unknown", "pid": holder pid,
    "holder": {run, started, from, pid} of a busy lock, "error": why} from the MARK line."""
    for line in lines:
        if not line.startswith(MARK + " "):
            continue
        kind, _, rest = line[len(MARK) + 1:].partition(" ")
        if kind == "taken":
            return {"state": "taken", "pid": int(rest) if rest.strip().isdigit() else 0}
        if kind == "busy":
            return {"state": "busy", "holder": dict(re.findall(r"(\w+)=(\S+)", rest))}
        if kind == "free":
            return {"state": "free"}
        return {"state": "error", "error": rest.strip()}
    return {"state": "unknown", "error": "no answer from the lock command"}


def busy_message(host_name: str, holder: dict, path: str = LOCK) -> str:
    started = holder.get("started", "?").replace("T", " ").replace("Z", " UTC")
    return (f"host {host_name!r}: another deploy is running here (started {started} from "
            f"{holder.get('from', '?')}, run {holder.get('run', '?')}); wait for it, or remove "
            f"{path} if that run is gone")


def take(state, host_, run_batch) -> dict:
    """Take (or, with --dry, check) the lock on host_ in the run's first command on it.

    run_batch(prelude) runs prelude in the host's first command (with the prefetched facts)
    and returns that command's output lines. Returns parse()'s dict; "busy" for a lock
    another run holds (a lock this run took already, for a second inventory name of the
    same machine, counts as taken)."""
    info = run_info(state)
    dry = is_dry()
    lock = parse(run_batch(check_command() if dry else take_command(info)))
    if lock["state"] == "busy" and lock["holder"].get("run") == info["run"]:
        lock = {"state": "taken", "pid": 0}
    lock["dry"] = dry
    return lock


def is_dry() -> bool:
    """Whether this is a --dry run: pyinfra 3.10 keeps the flag only in its CLI's
    arguments (the state knows whether it executes only once the operations run)."""
    import click

    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.params.get("dry"))


class Release(BaseStateCallback):
    """Releases the lock as pyinfra lets go of each host, by ending the SSH connection the
    holder watches: pyinfra's SSH connector keeps it open until the process exits, and a
    command to end the holder would cost every run a round trip per host."""

    @staticmethod
    def host_disconnect(state, host_):
        client = getattr(host_.connector, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # already gone: so is the holder
                pass


@operation()
def hold(lock: dict):
    """
    Stop this host when another deploy holds its lock; else note that this run holds it.

    + lock: hostlock.take()'s answer for this host, read by the run's first command

    Taking the lock is no change to the host (nothing stays once the run ends), so this
    operation never counts as one: the lock was taken before any operation ran.
    """
    state = lock["state"]
    if state == "busy":
        message = busy_message(host.name, lock["holder"])
        if lock["dry"]:
            host.log_styled(f"{message} (a real run would stop on this host now)", fg="yellow")
            host.noop("another deploy holds the lock")
            return
        yield fail(message)
        return
    if state in ("error", "unknown") and not lock["dry"]:
        yield fail(f"host {host.name!r}: could not take the deploy lock {LOCK}: {lock['error']}; "
                   "Fix: make /run/lock writable for the SSH user (util-linux's flock is needed)")
        return
    host.noop("checked: no other deploy holds the lock" if lock["dry"]
              else f"this run holds the deploy lock {LOCK}")
