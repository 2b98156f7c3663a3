"""The lab for the tests: hosts h1 and h2 take the deploy, h3 is probed by hand."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(items):
    # Slow lab tests last, so quick unit tests fail fast.
    items.sort(key=lambda item: "lab" in item.fixturenames)


class Lab:
    def __init__(self, inventory: Path, state: dict):
        self.inventory = inventory
        self.state = state
        self.hosts = {h["name"]: h for h in state["hosts"]}

    def ssh(self, host: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
        from lab.lab import LAB

        h = self.hosts[host]
        argv = ["ssh", "-i", str(LAB / "ssh" / "id_ed25519"), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={LAB / 'ssh' / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-p", str(h["port"]), "root@127.0.0.1",
                command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{host}] {command!r} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def deploy(self, *args: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("pyinfra")
        # --dry must not get -y: with it pyinfra skips the change detection it should print.
        yes = [] if "--dry" in args else ["-y"]
        argv = [str(exe), *yes, str(inventory or self.inventory), "deploy.py", *args]
        # pyinfra logs to stderr; one stream keeps its lines in order.
        return subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=1800)


@pytest.fixture(scope="session")
def lab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    from lab import hosts as labhosts
    from lab import lab as labmod

    # Up twice: the second replaces the first's hosts and keeps its stand-ins.
    first = labmod.up(1)
    first_pid = labmod.load_state()["hosts"][0]["pid"]
    inventory = labmod.up(3, variants={"h1": "auto", "h2": "int8", "h3": "int4"})
    assert inventory == first and not labhosts._alive(first_pid)
    state = labmod.load_state()
    try:
        yield Lab(inventory, state)
    finally:
        if not os.environ.get("CHATGLM_LAB_KEEP"):
            labmod.down()
            # Teardown leaves no mounts, namespaces or processes behind.
            mounts = Path("/proc/mounts").read_text()
            assert str(labmod.LAB) not in mounts, mounts
            pids = [h["pid"] for h in state["hosts"]] + [v["pid"] for v in state["services"].values()]
            assert not [p for p in pids if labhosts._alive(p)]
            assert not list((labmod.LAB / "hosts").glob("*"))


def quote(value: str) -> str:
    return shlex.quote(value)
