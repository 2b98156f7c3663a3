"""weights_transfer='swarm': the hosts fetch the control cache's verified weights from the
control machine and from each other, over BitTorrent.

Why BitTorrent through aria2 (and not a push, or HTTP fan-out of our own): in a push every byte
leaves the control machine once per host, so N hosts take N times as long; in a swarm each
host uploads the pieces it has to the others while it downloads, so the fleet's links carry the
copies and the time stays near that of one host. aria2 (Debian/Ubuntu package `aria2`) is a
well-kept engine that verifies every piece (SHA-1 in the torrent) and opentracker (package
`opentracker`) a tracker with a whitelist; we write neither protocol.

What runs, and for how long (docs/swarm.md):

- on the control machine, while at least one host of the run is fetching: opentracker, admitting
  only this run's info-hash (the torrent carries a random nonce, so the hash is new each run),
  and an aria2c seeding the cache's blobs; both bind only to the address the hosts' SSH
  connections reach this machine at (or weights_swarm_address). The last host to finish stops
  them (by PID); so do the end of the deploy, an exception, and, should the deploy be killed,
  a watcher process that outlives it by at most a second;
- on each host, for its download only: aria2c bound to the host's own address on the route to
  the control machine, in the foreground of the SSH command, exiting when its download is
  complete (--seed-time=0) and within a second of the run's end however it ends
  (--stop-with-process names the process that holds the host's deploy lock, which lives exactly
  as long as the run's SSH connection: operations/hostlock.py).

The blobs land in <model_dir>/.chatglm-swarm/blobs/<sha256>; each is then checked with sha256
against the LFS pointer on the host before it replaces the pointer, as in every mode.
"""

import atexit
import ipaddress
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

from pyinfra.api import StringCommand
from pyinfra.api.command import QuoteString

from runtime import torrent

from .hostlock import LOCK
from .settings import SettingError, Settings

TRANSFERS = ("push", "swarm")
CONTROL_TOOLS = {"aria2c": "aria2", "opentracker": "opentracker"}
HOST_PACKAGES = ["aria2", "iproute2"]  # iproute2: `ip route get` finds the host's own address
FOLDER = ".chatglm-swarm"  # under the model checkout, beside the pointers it replaces
STALL_S = 120  # a host's download that gets no byte this long gives up (a rerun resumes it)
# aria2c's options on both sides: peers from the tracker only, IPv4 on the one address.
COMMON = ["--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
          "--enable-peer-exchange=false", "--disable-ipv6=true", "--enable-color=false",
          "--bt-tracker-interval=5", "--bt-max-peers=0", "--file-allocation=none"]
# The control machine's aria2c: seeds the verified cache as it is (no piece check) for ever.
SEED = COMMON + ["--seed-ratio=0.0", "--bt-seed-unverified=true", "--check-integrity=false",
                 "--console-log-level=warn", "--summary-interval=0"]
# A host's aria2c: checks what a cut download left, exits once complete.
FETCH = COMMON + ["--seed-time=0", "--check-integrity=true", f"--bt-stop-timeout={STALL_S}"]
logger = logging.getLogger("pyinfra")


def check_settings(s: Settings) -> None:
    """weights_transfer and weights_swarm_address, and this machine's tools for a swarm."""
    if s.weights_transfer not in TRANSFERS:
        raise SettingError(s.host, "weights_transfer", f"= {s.weights_transfer!r} is unknown",
                           "use 'push' (the control machine uploads to each host) or 'swarm'")
    if s.weights_swarm_address:
        try:
            ipaddress.IPv4Address(s.weights_swarm_address)
        except ValueError:
            raise SettingError(s.host, "weights_swarm_address",
                               f"= {s.weights_swarm_address!r} is not an IPv4 address",
                               "set the address of this machine that the hosts reach, such as "
                               "'10.0.0.5', or leave it empty for the one their SSH uses") from None
    if s.weights_transfer != "swarm":
        return
    if s.weights_mode != "control":
        raise SettingError(s.host, "weights_transfer", f"= 'swarm' with weights_mode="
                           f"{s.weights_mode!r}: the swarm is fed from the control cache",
                           "set weights_mode='control', or weights_transfer='push'")
    missing = [pkg for tool, pkg in CONTROL_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SettingError(s.host, "weights_transfer", "= 'swarm' needs aria2c and opentracker "
                           "on this (the control) machine", f"apt-get install {' '.join(missing)}, "
                           "or set weights_transfer='push'")


def control_address(host, s: Settings) -> str:
    """The address of this machine that the host reaches: the setting, else the local end of
    the host's SSH connection (the route the fleet already uses)."""
    if s.weights_swarm_address:
        return s.weights_swarm_address
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is not None and isinstance(transport.sock, socket.socket):
        return transport.sock.getsockname()[0]
    return "127.0.0.1"  # @local: the host is this machine


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class TrackerRefused(OSError):
    """The run's tracker did not take the run's info-hash in time."""


class Swarm:
    """The control side of one swarm: a torrent of some cache blobs, its tracker and seeder.
    Started by the first host that enters, stopped when the last one leaves."""

    def __init__(self, cache: Path, address: str, blobs: list):
        self.cache, self.address, self.blobs = cache, address, blobs
        self.lock = threading.Lock()  # gevent's under pyinfra's CLI: one start at a time
        self.users, self.procs, self.run_dir = 0, {}, None
        self.torrent = b""
        self.info_hash = ""

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                self._start()
                return
            except TrackerRefused:
                # Now and then opentracker keeps refusing its whitelisted hash (even after
                # SIGHUP): a fresh tracker, with a fresh run hash, has always taken it.
                self.stop()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self.stop()
                raise

    def _start(self) -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="chatglm-swarm-"))
        self.run_dir = run_dir
        # opentracker drops to user nobody before it reads its whitelist.
        run_dir.chmod(0o755)
        seed = run_dir / "blobs"
        seed.mkdir()
        for oid, _ in self.blobs:
            (seed / oid).symlink_to(self.cache / "blobs" / oid)
        pieces = torrent.pieces_cached(str(self.cache / "blobs"), self.blobs,
                                       str(self.cache / "swarm"))
        tracker_port, seed_port = _free_port(self.address), _free_port(self.address)
        self.torrent, self.info_hash = torrent.make(
            "blobs", self.blobs, pieces, f"http://{self.address}:{tracker_port}/announce")
        (run_dir / "run.torrent").write_bytes(self.torrent)
        whitelist = run_dir / "whitelist"
        whitelist.write_text(self.info_hash + "\n")
        whitelist.chmod(0o644)
        # Should this process be killed outright, the watcher ends the processes listed in
        # pids within a second and removes the run's folder.
        (run_dir / "pids").touch()
        self.procs["watcher"] = subprocess.Popen(
            ["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
                         f"kill $(cat {shlex.quote(str(run_dir / 'pids'))}) 2>/dev/null; sleep 1; "
                         f"rm -rf {shlex.quote(str(run_dir))}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self._spawn("tracker", ["opentracker", "-i", self.address, "-p", str(tracker_port),
                                "-P", str(tracker_port), "-w", str(whitelist)])
        # opentracker reads its whitelist on a thread of its own after it listens: a peer that
        # announces before that is refused and waits a whole interval to ask again.
        try:
            self._wait("tracker", lambda: self._admitted(tracker_port), seconds=4,
                       nudge=lambda: self.procs["tracker"].send_signal(signal.SIGHUP))
        except OSError as error:
            raise TrackerRefused(str(error)) from None
        self._spawn("seeder", ["aria2c", *SEED, f"--interface={self.address}", f"--listen-port={seed_port}",
                               f"--stop-with-process={os.getpid()}", "-d", str(run_dir),
                               str(run_dir / "run.torrent")])
        # Ready once the tracker lists the seeder: the hosts' first announce finds it.
        self._wait("seeder", lambda: self._listening(seed_port) and self._seeded(tracker_port))

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start one of the swarm's servers in the run's folder, logging there, and list its
        PID for the watcher."""
        with open(self.run_dir / "log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=self.run_dir, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log, start_new_session=True)
        with open(self.run_dir / "pids", "a") as pids:
            pids.write(f"{self.procs[name].pid}\n")

    def _wait(self, what: str, ready, seconds: float = 10, nudge=None) -> None:
        """Until ready(); every 2 s nudge() (opentracker reloads its whitelist on SIGHUP)."""
        start = time.monotonic()
        deadline, nudged = start + seconds, start
        while not ready():
            if nudge is not None and time.monotonic() - nudged > 2:
                nudge()
                nudged = time.monotonic()
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                tail = (self.run_dir / "log").read_text(errors="replace")[-600:]
                raise OSError(f"the swarm's {', '.join(dead) or what} did not start "
                              f"on {self.address}: {tail.strip()}")
            time.sleep(0.1)

    def _ask(self, tracker_port: int, path: str, query: dict) -> dict | None:
        """The tracker's bencoded answer about the run's info-hash; None when it gives none."""
        query = {**query, "info_hash": bytes.fromhex(self.info_hash)}
        url = f"http://{self.address}:{tracker_port}/{path}?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return torrent.bdecode(resp.read())
        except (OSError, ValueError):
            return None

    def _admitted(self, port: int) -> bool:
        """Whether the tracker takes the run's info-hash: a probe peer joins (opentracker checks
        its whitelist only for a peer that joins), then leaves."""
        probe = dict(peer_id=b"-CG0000-probe0000000", port=1, uploaded=0, downloaded=0, left=0, compact=1,
                     numwant=0)
        answer = self._ask(port, "announce", probe)
        if answer is None or b"failure reason" in answer:
            return False
        self._ask(port, "announce", {**probe, "event": "stopped"})
        return True

    def _seeded(self, port: int) -> bool:
        """Whether the tracker lists a seeder (a complete peer) for the run's info-hash."""
        files = (self._ask(port, "scrape", {}) or {}).get(b"files", {})
        return files.get(bytes.fromhex(self.info_hash), {}).get(b"complete", 0) >= 1

    def _listening(self, port: int) -> bool:
        try:
            with socket.create_connection((self.address, port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """End the tracker, the seeder and the watcher (by PID) and remove the run's folder."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = {}
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def enter(self) -> None:
        with self.lock:
            if self.users == 0:
                self.start()
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self.stop()


_swarms: dict[tuple, Swarm] = {}


@atexit.register
def stop_all() -> None:
    """The deploy ends (or fails, or is interrupted): nothing of a swarm outlives it."""
    for swarm in _swarms.values():
        swarm.stop()


def staging(model_dir: str) -> str:
    return f"{model_dir}/{FOLDER}"


def blob_path(model_dir: str, oid: str) -> str:
    """Where a host's download of a blob lies until it is checked and moved over its pointer."""
    return f"{staging(model_dir)}/blobs/{oid}"


def host_script(model_dir: str, address: str) -> str:
    """Shell run on the host: aria2c fetches <staging>/run.torrent's blobs into <staging>
    from the swarm, bound to the host's address towards the control machine, for this run
    only. Its exit codes become ERROR lines naming the path or the setting and the fix."""
    d = shlex.quote(staging(model_dir))
    opts = " ".join(FETCH + ["--summary-interval=5", "--console-log-level=warn",
                             "--download-result=hide", "--show-console-readout=false"])
    return (
        "command -v aria2c >/dev/null || { echo 'ERROR: aria2c is missing on this host. Fix: "
        "install the package aria2 (the system stage does when weights_transfer=swarm)' >&2; exit 1; }; "
        f"holder=$(sed -n 's/.* pid=\\([0-9][0-9]*\\).*/\\1/p' {LOCK} 2>/dev/null); "
        "[ -n \"$holder\" ] && [ -d /proc/$holder ] || { echo 'ERROR: no process holds the deploy "
        f"lock of this run ({LOCK}), which ends the swarm download with the run' >&2; exit 1; }}; "
        f"src=$(ip -o -4 route get {shlex.quote(address)} 2>/dev/null | "
        "sed -n 's/.* src \\([0-9.]*\\).*/\\1/p'); "
        f"[ -n \"$src\" ] || {{ echo 'ERROR: this host has no route to {address} (the control "
        "machine). Fix: set weights_swarm_address to an address of it the hosts reach, or "
        "weights_transfer=push' >&2; exit 1; }; "
        # A cut download's blobs stay; -V keeps their pieces that check out under the new torrent.
        f"rm -f {d}/*.aria2; "
        f"aria2c {opts} --interface=\"$src\" --stop-with-process=\"$holder\" "
        f"-d {d} {d}/run.torrent; rc=$?; rm -f {d}/run.torrent; case $rc in 0) ;; "
        f"9) echo 'ERROR: No space left on device while writing under '{d}'. Fix: free space "
        "there or set install_dir to a larger filesystem (a rerun resumes)' >&2; exit 1;; "
        f"7) echo 'ERROR: the swarm download got no byte for {STALL_S} s from {address} or "
        "the other hosts. Fix: let the hosts reach each other and that address (or set "
        "weights_swarm_address), or weights_transfer=push; a rerun resumes' >&2; exit 1;; "
        "*) echo \"ERROR: aria2c exited $rc (codes: man aria2c, EXIT STATUS); a rerun "
        "resumes\" >&2; exit 1;; esac"
    )


def fetch(state, host, s: Settings, model_dir: str, blobs: list) -> bool:
    """FunctionCommand: this host's part in the swarm of blobs [(sha256, size)], all already
    verified in the control cache; fails only this host."""
    from .model import fetch_failed  # the one way a host's download reports its errors

    cache = Path(s.weights_cache).expanduser()
    address = control_address(host, s)
    key = (str(cache), address, tuple(blobs))
    swarm = _swarms.setdefault(key, Swarm(cache, address, list(blobs)))
    try:
        swarm.enter()
    except OSError as error:
        host.log_styled(f"weights: {error}", fg="red", log_func=logger.error)
        return False
    try:
        folder = staging(model_dir)
        ok, output = host.run_shell_command(StringCommand("mkdir", "-p", QuoteString(folder)))
        if ok:
            ok = host.put_file(BytesIO(swarm.torrent), f"{folder}/run.torrent")
        if not ok:
            host.log_styled(f"weights: cannot write {folder}/run.torrent: "
                            + " ".join(output.stderr_lines if output else []),
                            fg="red", log_func=logger.error)
            return False
        ok, output = host.run_shell_command(
            StringCommand("sh", "-c", QuoteString(host_script(model_dir, address))),
            print_output=True)
        if not ok:
            fetch_failed(host, output)
        return ok
    finally:
        swarm.leave()
