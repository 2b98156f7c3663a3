"""The control side of a swarm (operations/swarm.py, runtime/webseed.py) on loopback: what
listens, that it serves only the run's paths, and that it is gone after the run however the
run ends (a kill -9 of the deploy included)."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab.hosts import _alive
from operations.swarm import Swarm

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


def test_serves_the_run_only_on_its_address_then_stops(tmp_path):
    oid, data = cache_with_blob(tmp_path)
    swarm = Swarm(tmp_path, "127.0.0.1", [(oid, len(data))])
    swarm.enter()
    try:
        pids = [p.pid for p in swarm.procs.values()]
        addresses = listening(pids)
        # tracker (TCP and UDP), seeder, web seed; on the given address only
        assert len(addresses) == 4 and all(a.startswith("127.0.0.1:") for a in addresses), addresses
        url = swarm.webseed + f"blobs/{oid}"
        assert get(url)[2] == data
        status, headers, body = get(url, {"Range": "bytes=1000-1999"})
        assert status == 206 and body == data[1000:2000]
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert get(url, {"Range": "bytes=-10"})[2] == data[-10:]
        base = swarm.webseed.rsplit("/", 2)[0]
        for bad in (f"{base}/wrong/blobs/{oid}", swarm.webseed + f"blobs/../blobs/{oid}",
                    swarm.webseed + "whitelist", swarm.webseed + "blobs/nothing"):
            with pytest.raises(urllib.error.HTTPError) as error:
                get(bad)
            assert error.value.code == 404, bad
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
    assert len(pids) == 4 and all(_alive(p) for p in pids)
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
