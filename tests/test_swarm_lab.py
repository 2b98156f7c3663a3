"""weights_transfer='swarm' end to end over SSH on lab hosts h27-h29 (int4 fixture).

Real deploys (stages system,model): the hosts install aria2 from the image's apt archive and
fetch the control cache's blobs over BitTorrent from this machine (opentracker, a seeding
aria2c) and from each other. While a deploy runs, a sampler records every
process of the swarm (by PID) and every socket they listen on; afterwards each
of those PIDs must be gone, nothing of theirs listening, and the run's folders removed.
"""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


from lab import hosts as labhosts
from lab.lab import LAB
from tests.conftest import ROOT
from tests.test_deploy_lab import totals
from tests.test_model_lab import (clean, fresh_share, inventory, model_dir, said,  # noqa: F401
                                  seafile, weights_ok)

HOSTS = ("h27", "h28", "h29")
INSTALL = "/opt/chatglm-swarm"
TOOLS = ("aria2c", "opentracker")


def _ours(pid: str, cache: Path) -> str | None:
    """'tracker', 'seeder' or 'host' for a swarm process of this test."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm not in TOOLS:
            return None
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if comm == "opentracker" and "chatglm-swarm-" in cmd:
        return "tracker"
    if "chatglm-swarm-" in cmd:
        return "seeder"
    if f"{INSTALL}/models/" in cmd and ".chatglm-swarm" in cmd:
        return "host"
    return None


class Sampler:
    """Every swarm process seen while a deploy runs ({pid: role}) and the addresses they
    listen on ({'address:port'})."""

    def __init__(self, cache: Path):
        self.cache, self.pids, self.listening = cache, {}, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    role = _ours(pid, self.cache)
                    if role:
                        self.pids[int(pid)] = role
            if self.pids:
                out = subprocess.run(["ss", "-Hlntup"], capture_output=True, text=True).stdout
                for line in out.splitlines():
                    if any(f"pid={p}," in line for p in self.pids):
                        self.listening.add(line.split()[4])
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def nothing_left(sampler: Sampler) -> None:
    """No process the sampler saw is alive; none of them listens; no run folder is left."""
    deadline = time.time() + 8  # each process notices the run's end within a second or two
    while time.time() < deadline and ([p for p in sampler.pids if labhosts._alive(p)]
                                      or list(Path("/tmp").glob("chatglm-swarm-*"))):
        time.sleep(0.2)
    assert not [p for p in sampler.pids if labhosts._alive(p)], sampler.pids
    ss = subprocess.run(["ss", "-Hlntup"], capture_output=True, text=True).stdout
    assert not [line for line in ss.splitlines() for p in sampler.pids if f"pid={p}," in line], ss
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _ours(p, sampler.cache)]
    assert not list(Path("/tmp").glob("chatglm-swarm-*"))


def disks(lab) -> dict:
    return {h: labhosts.disk_snapshot(lab.hosts[h]) for h in HOSTS}


def test_swarm_to_three_hosts(lab, fresh_share):
    """--dry writes nothing; the deploy places verified weights through the swarm (a tracker,
    a seeder and three host downloads seen, listening on loopback only); nothing is left;
    the rerun changes nothing; a host whose download fails does not stop the others."""
    cache = LAB / "cache-swarm-test"
    shutil.rmtree(cache, ignore_errors=True)
    clean(lab, HOSTS, INSTALL)
    data = {"variant": "int4", "install_dir": INSTALL, "weights_mode": "control",
            "weights_cache": str(cache), "weights_transfer": "swarm", "stages": "system,model"}
    inv = inventory("swarm", {h: dict(data) for h in HOSTS})

    before = disks(lab)
    with Sampler(cache) as dry_sampler:
        dry = lab.deploy("--dry", inventory=inv)
    assert dry.returncode == 0, dry.stdout[-4000:]
    assert disks(lab) == before
    assert not dry_sampler.pids and not (cache / "blobs").exists()

    with Sampler(cache) as sampler:
        first = lab.deploy(inventory=inv)
    assert first.returncode == 0, first.stdout[-6000:]
    for host in HOSTS:
        assert weights_ok(lab, host, "int4", INSTALL), host
        assert ".chatglm-swarm" not in lab.ssh(host, f"ls -A {model_dir('int4', INSTALL)}").stdout
    roles = sorted(sampler.pids.values())
    assert roles.count("tracker") == roles.count("seeder") == 1, sampler.pids
    assert roles.count("host") == len(HOSTS), sampler.pids
    assert sampler.listening and all(a.startswith("127.0.0.1:") for a in sampler.listening), \
        sampler.listening
    nothing_left(sampler)
    # The share served each blob once, to the control cache.
    stats = seafile("GET", "stats")
    blobs = list((cache / "blobs").iterdir())
    assert stats["redirects"] == len(blobs) > 0, stats

    second = lab.deploy(inventory=inv)
    assert second.returncode == 0, second.stdout[-4000:]
    t = totals(second.stdout)
    assert t["success"] == 0 and t["error"] == 0 and t["no_change"] == t["hosts"], t

    # h29's download fails (its aria2c exits as on a full disk): h27 and h28 still get the
    # weights, h29 keeps its pointer and the report names the path and the fix.
    clean(lab, HOSTS, INSTALL)
    lab.ssh("h29", "printf '#!/bin/sh\\nexit 9\\n' > /usr/local/bin/aria2c && "
                   "chmod +x /usr/local/bin/aria2c")
    try:
        with Sampler(cache) as sampler:
            third = lab.deploy(inventory=inv)
        assert third.returncode != 0
        for host in ("h27", "h28"):
            assert weights_ok(lab, host, "int4", INSTALL), host
        assert not weights_ok(lab, "h29", "int4", INSTALL)
        assert said(third.stdout, "h29", "No space left on device while writing under "
                    f"{model_dir('int4', INSTALL)}/.chatglm-swarm"), third.stdout[-4000:]
        nothing_left(sampler)
    finally:
        lab.ssh("h29", "rm -f /usr/local/bin/aria2c")
    fourth = lab.deploy(inventory=inv)
    assert fourth.returncode == 0, fourth.stdout[-4000:]
    assert weights_ok(lab, "h29", "int4", INSTALL)


def test_swarm_settings_are_checked_before_any_host(lab):
    """A swarm without the control cache, or an address that is none, stops the run."""
    for data, text in (
            ({"weights_mode": "direct"}, "setting 'weights_transfer' = 'swarm' with weights_mode='direct'"),
            ({"weights_swarm_address": "ctrl.lan"}, "setting 'weights_swarm_address' = 'ctrl.lan' is not"),
            ({"weights_transfer": "bittorrent"}, "setting 'weights_transfer' = 'bittorrent' is unknown")):
        inv = inventory("swarm-bad", {"h27": {"variant": "int4", "install_dir": INSTALL,
                                              "weights_transfer": "swarm", **data}})
        out = lab.deploy(inventory=inv)
        assert out.returncode != 0 and text in out.stdout, out.stdout[-3000:]


def test_deploy_killed_during_the_swarm_leaves_nothing(lab, fresh_share):
    """kill -9 of the deploy as soon as a host's aria2c runs: within seconds no process of
    the swarm is left on this machine or the hosts, nothing listens, no run folder stays;
    the rerun converges."""
    cache = LAB / "cache-swarm-test"
    clean(lab, HOSTS, INSTALL)
    data = {"variant": "int4", "install_dir": INSTALL, "weights_mode": "control",
            "weights_cache": str(cache), "weights_transfer": "swarm", "stages": "system,model"}
    inv = inventory("swarm-kill", {h: dict(data) for h in HOSTS})
    exe = Path(sys.executable).with_name("pyinfra")
    with Sampler(cache) as sampler:
        proc = subprocess.Popen([str(exe), "-y", str(inv), "deploy.py"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while "host" not in sampler.pids.values() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        time.sleep(0.5)
    assert "host" in sampler.pids.values(), "the deploy ended before any host's aria2c ran"
    nothing_left(sampler)
    rerun = lab.deploy(inventory=inv)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    for host in HOSTS:
        assert weights_ok(lab, host, "int4", INSTALL), host
