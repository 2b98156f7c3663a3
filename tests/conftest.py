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


H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_cap": "9.0",
        "pci": "00000000:01:00.0", "device_id": "0x2330"}
# h1-h3: CPU hosts. h4-h8: simulated H100 hosts for the GPU stack, one scenario each.
# h9 (CPU) and h10 (simulated H100, no driver): the system and Python stages only.
# h11: CPU host for the fp16 fleet run.
HOSTS = ["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9", "h10", "h11"]
GPUS = {
    "h4": {"gpus": [H100], "kernel_module_version": "580.95.05"},   # fresh install
    "h5": {"gpus": [H100], "kernel_module_version": "570.195.03"},  # old module still loaded
    "h6": {"gpus": [H100], "kernel_module_version": "580.95.05"},   # driver outside ld.so cache
    "h7": {"gpus": [H100], "kernel_module_version": "570.195.03"},  # pinned 570 + CUDA 12.8
    "h8": {"gpus": [H100], "secure_boot": True},                     # Secure Boot, no module
    "h10": {"gpus": [H100]},                                          # no driver yet
}
GPU_STAGES = {"stages": "system,gpu,cuda_libs", "kernel_headers": False,
              "python": "/opt/lookup/bin/python"}
GPU_DATA = {h: dict(GPU_STAGES) for h in GPUS}
GPU_DATA["h7"].update(driver_branch="570", cuda_version="12.8")
GPU_DATA.update(h9={"stages": "system,python"}, h10={"stages": "system,python"})

# h15-h20: the model stage (tests/test_model_lab.py writes their data into its own inventories).
# h18 holds fp16 (too big for a CPU host's RAM) on a simulated H100; h19 has a 6 GiB GPU of
# an id missing from data/compat.toml.
# lab.up names its hosts h1..hN, so h12-h14 come up too (idle).
# h12-h14 and h21-h24: the fault suite (tests/test_faults_lab.py); h21 a simulated H100
# without a driver. h25-h26: two deploys at once, Ctrl-C, odd paths, host keys
# (tests/test_concurrency_lab.py, which makes them fresh as it needs).
HOSTS += [f"h{i}" for i in range(12, 27)]
# h27-h29: weights_transfer='swarm' (tests/test_swarm_lab.py).
HOSTS += ["h27", "h28", "h29"]
GPUS.update({"h18": {"gpus": [H100]},
             "h19": {"gpus": [{**H100, "name": "NVIDIA small", "memory_mib": 6144,
                               "device_id": "0x1f99"}]},
             "h21": {"gpus": [H100]}})
# h30, h31: hosts that boot systemd as PID 1, each in a netns of its own (lab.hosts,
# kind "systemd"), for the serve stage (tests/test_serve_lab.py): h30 takes the deploy, h31
# stays fresh for the checks made before any host is touched.
SYSTEMD_HOSTS = ("h30", "h31")


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
    inventory = labmod.up(len(HOSTS), variants={"h1": "auto", "h2": "int8", "h3": "int4", "h11": "fp16",
                                                "h30": "int4", "h31": "int4"},
                          gpus=GPUS, extra=GPU_DATA, systemd_hosts=SYSTEMD_HOSTS)
    assert inventory == first and not labhosts._alive(first_pid)
    state = labmod.load_state()
    try:
        yield Lab(inventory, state)
    finally:
        if not os.environ.get("CHATGLM_LAB_KEEP"):
            labmod.down()
            # Teardown leaves no mounts, namespaces or processes behind.
            mounts = Path("/proc/mounts").read_text()
            assert f" {labmod.LAB}/" not in mounts, mounts  # not .lab-bench, a bench's own lab
            pids = [h["pid"] for h in state["hosts"]] + [v["pid"] for v in state["services"].values()]
            # The systemd hosts' socats (SSH forward, stand-in relays) and network namespaces too.
            pids += [p for h in state["hosts"] for p in h.get("helpers", [])]
            assert not [p for p in pids if labhosts._alive(p)]
            netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert not [h for h in state["hosts"] if h.get("netns") and h["netns"] in netns], netns
            assert not list((labmod.LAB / "hosts").glob("*"))


def quote(value: str) -> str:
    return shlex.quote(value)
