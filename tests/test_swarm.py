"""The control side of a swarm (operations/swarm.py) on loopback: what listens, that the
tracker admits only the run's info-hash, and that it is all gone after the run however the
run ends (a kill -9 of the deploy included)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lab.hosts import _alive
from operations.swarm import Swarm
from runtime import torrent

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (shutil.which("aria2c") and shutil.which("opentracker")),
                                reason="aria2c and opentracker are not installed")


def cache_with_blob(tmp_path, size=300_000):
    data = os.urandom(size)
    oid = hashlib.sha256(data).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / oid).write_bytes(data)
    return oid, data


def listening(pids) -> list[str]:
    out = subprocess.run(["ss", "-Hlntup"], capture_output=True, text=True).stdout
    return [line.split()[4] for line in out.splitlines() for p in pids if f"pid={p}," in line]


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.headers, resp.read()


def announce(tracker: str, info_hash: str) -> bytes:
    query = urllib.parse.urlencode({"info_hash": bytes.fromhex(info_hash), "peer_id": b"-T-" + b"0" * 17,
                                    "port": 1, "uploaded": 0, "downloaded": 0, "left": 1,
                                    "compact": 1})
    with urllib.request.urlopen(f"{tracker}?{query}", timeout=5) as resp:
        return resp.read()


def test_listens_on_its_address_admits_its_hash_only_then_stops(tmp_path):
    oid, data = cache_with_blob(tmp_path)
    swarm = Swarm(tmp_path, "127.0.0.1", [(oid, len(data))])
    swarm.enter()
    try:
        pids = [p.pid for p in swarm.procs.values()]
        addresses = listening(pids)
        # the tracker (TCP and UDP) and the seeder, on the given address only
        assert len(addresses) == 3 and all(a.startswith("127.0.0.1:") for a in addresses), addresses
        meta = torrent.bdecode(swarm.torrent)
        tracker = meta[b"announce"].decode()
        assert meta[b"info"][b"private"] == 1
        # The tracker lists the seeder for the run's info-hash, and nothing for another one.
        peers = torrent.bdecode(announce(tracker, swarm.info_hash))[b"peers"]
        assert len(peers) >= 6 and len(peers) % 6 == 0
        other = hashlib.sha1(b"another torrent").hexdigest()
        assert b"peers" not in torrent.bdecode(announce(tracker, other)) or \
            not torrent.bdecode(announce(tracker, other))[b"peers"]
        run_dir = swarm.run_dir
    finally:
        swarm.leave()
    assert not [p for p in pids if _alive(p)] and not listening(pids)
    assert not run_dir.exists()


KILLED = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from operations.swarm import Swarm
from runtime import torrent
swarm = Swarm(Path({cache!r}), "127.0.0.1", [({oid!r}, {size})])
swarm.enter()
print(json.dumps([str(swarm.run_dir), [p.pid for p in swarm.procs.values()]]), flush=True)
time.sleep(600)
"""


def test_a_killed_deploy_leaves_nothing(tmp_path):
    """The control process killed outright (no atexit, no finally): the seeder and the
    watcher notice within about a second, end the rest and remove the run's folder."""
    oid, data = cache_with_blob(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(
        root=str(ROOT), cache=str(tmp_path), oid=oid, size=len(data))], stdout=subprocess.PIPE,
        text=True)
    run_dir, pids = json.loads(proc.stdout.readline())
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    assert listening(pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and [p for p in pids if _alive(p)]:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
    assert not listening(pids)
    while time.time() < deadline + 2 and Path(run_dir).exists():
        time.sleep(0.1)
    assert not Path(run_dir).exists()
