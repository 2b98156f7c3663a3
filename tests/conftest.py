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
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="session")
def lab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    from lab import lab as labmod

    inventory = labmod.up(3, variants={"h1": "auto", "h2": "int8", "h3": "int4"})
    try:
        yield Lab(inventory, labmod.load_state())
    finally:
        if not os.environ.get("CHATGLM_LAB_KEEP"):
            labmod.down()


def quote(value: str) -> str:
    return shlex.quote(value)
