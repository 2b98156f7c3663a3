"""The fault suite: the deploy's reliability and dry-run guarantees, over SSH on lab hosts.

Hosts: h12 (int4, control cache), h13 (int8, direct), h14 (fp16 whose shard the share never
delivers), h21 (a simulated H100 without a driver), h22-h24 (fresh CPU hosts to lose, kill
and fill), h19 (a 6 GiB GPU, read-only here). Each scenario writes its own inventory (the
lab's connection data plus the scenario's settings) and runs the real deploy. A host's disk
is compared through lab.hosts.disk_snapshot: every byte its processes ever wrote.

The scenarios, in order (each builds on the hosts the one before left):
 1. --dry --diff on fresh hosts lists the changes and leaves every disk byte-identical;
 2. bad inventory data stops the run before any operation, every disk byte-identical;
 3. share faults through a whole deploy, one host unreachable, one whose weights the share
    never serves: the others finish, the report names each failed host and its stage; the
    second run changes nothing; --dry --diff on converged and drifted hosts writes nothing;
 4. a host lost mid-deploy (powered off while pip runs): the others finish; back on, a rerun
    converges;
 5. the deploy killed during the pip install and during the weight download (both modes):
    the rerun converges, the files are right, the run after it changes nothing;
 6. the disk filling up during the weight download, on the host and in the control cache:
    a clear error, the pointer untouched, and a rerun after freeing space completes.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import hosts as labhosts
from lab import lab as labmod
from lab.lab import LAB, PORTS
from tests.test_deploy_lab import totals
from tests.test_model_lab import (CHECK_WEIGHTS, MODELS, model_dir, said, seafile, weights_ok)

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPORT = LAB / "reports-faults"
CACHE = LAB / "cache-faults"
BIN = {v: f"/{MODELS[v]}/pytorch_model.bin" for v in ("int4", "int8")}
SHARD = "/chatglm-6b/pytorch_model-00001-of-00002.bin"


def inventory(name: str, hosts: dict) -> Path:
    """An inventory of the lab's hosts named in hosts, each with the scenario's data on top."""
    scope = {}
    exec(LAB.joinpath("inventory.py").read_text(), scope)
    base = dict(scope["lab"])
    lines = ["lab = ["]
    for host, data in hosts.items():
        merged = {**base[host], "report_dir": str(REPORT), "weights_cache": str(CACHE), **data}
        lines.append(f"    ({host!r}, {merged!r}),")
    path = LAB / f"inventory-faults-{name}.py"
    path.write_text("\n".join(lines + ["]", "from operations.preflight import check_ssh_keys",
                                        "check_ssh_keys(lab)", ""]))
    return path


def snapshots(hosts) -> dict:
    records = {h["name"]: h for h in labmod.load_state()["hosts"]}
    return {name: labhosts.disk_snapshot(records[name]) for name in hosts}


def changed(before: dict, after: dict) -> dict:
    """{host: sorted paths that differ} for the hosts whose disks differ."""
    out = {}
    for name in before:
        a, b = before[name], after[name]
        paths = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
        if paths:
            out[name] = paths[:20]
    return out


def detected(output: str) -> dict:
    """{operation: hosts it would change} from the 'Detected changes' table of a --dry run."""
    table = ANSI.sub("", output).split("--> Detected changes:")[1].split("Detected changes may")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"\s*(.+?)\s{2,}(-|\d+ \(([^)]*)\))\s{2,}", line)
        if match:
            rows[match.group(1)] = set(match.group(3).split(", ")) if match.group(3) else set()
    return rows


def fleet() -> dict:
    return json.loads((REPORT / "fleet.json").read_text())


def start(lab, inv: Path, *args: str) -> subprocess.Popen:
    """The deploy in the background, in its own process group (so it can be killed whole)."""
    exe = Path(sys.executable).with_name("pyinfra")
    log = open(LAB / f"{inv.stem}.log", "w")
    return subprocess.Popen([str(exe), "-y", str(inv), "deploy.py", *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(check, what: str, timeout: float = 300, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the deploy ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s")


def kill(proc: subprocess.Popen):
    """SIGKILL the deploy and everything it started on this machine: no cleanup runs."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def served(path: str) -> int:
    return seafile("GET", "stats")["per_file"].get(path, 0)


def converged(lab, inv: Path, *args: str):
    """Two runs: the first must succeed, the second must change nothing on any host."""
    first = lab.deploy(*args, inventory=inv)
    assert first.returncode == 0, first.stdout[-6000:]
    second = lab.deploy(*args, inventory=inv)
    t = totals(second.stdout)
    assert second.returncode == 0 and t["success"] == 0 and t["error"] == 0 \
        and t["no_change"] == t["hosts"], second.stdout[-4000:]
    return first


@pytest.fixture(scope="module")
def faults(lab):
    seafile("DELETE", "faults")
    seafile("DELETE", "stats")
    yield
    seafile("DELETE", "faults")


FRESH = {"h12": {"variant": "int4", "weights_mode": "control"},
         "h13": {"variant": "int8", "weights_mode": "direct"},
         "h21": {"variant": "auto", "kernel_headers": False}}


# --- 1 -----------------------------------------------------------------------------------

def test_dry_run_on_fresh_hosts_lists_changes_and_writes_nothing(lab, faults):
    inv = inventory("fresh", FRESH)
    before = snapshots(FRESH)
    dry = lab.deploy("--dry", "--diff", inventory=inv)
    assert dry.returncode == 0, dry.stdout[-6000:]
    assert changed(before, snapshots(FRESH)) == {}
    # What it would change, operation by operation: packages, the NVIDIA stack on the H100,
    # the environments, the clones and the smoke test everywhere.
    plan = detected(dry.stdout)
    everyone = {"h12", "h13", "h21"}
    for op in ("System: base packages", "Python: env with the planned Python, pip.conf",
               "Python: torch for the resolved CUDA and the pinned requirements",
               "Model: clone ChatGLM-6B code", "Model: clone the model repo", "Smoke: chat test"):
        assert plan[op] == everyone, (op, plan)
    for op in ("GPU: NVIDIA CUDA apt repo", "GPU: blacklist nouveau",
               "GPU: driver, CUDA toolkit, cuDNN", "GPU: /usr/local/cuda -> planned toolkit"):
        assert plan[op] == {"h21"}, (op, plan)
    assert seafile("GET", "stats")["requests"] == 0


# --- 2 -----------------------------------------------------------------------------------

C0 = "0123456789abcdef0123456789abcdef01234567"
BAD = {
    "unknown variant": ({"h13": {"variant": "int3"}},
                        "host 'h13': setting 'variant' = 'int3' is unknown. Fix: use one of"),
    "unpinned revision": ({"h12": {"model_revisions": {"int4": "main"}}},
                          "host 'h12': setting \"model_revisions['int4']\" = 'main' is not a pinned commit"),
    "unknown revision": ({"h12": {"model_revisions": {"int4": C0}}},
                         f"host 'h12': setting \"model_revisions['int4']\" = '{C0}': "),
    "CUDA too old for the GPU": ({"h21": {"cuda_version": "11.7"}},
                                 "host 'h21': setting 'cuda_version' = '11.7' is too old for"),
    "pinned driver too old": ({"h21": {"driver_branch": "470"}},
                              "host 'h21': setting 'driver_branch' = '470' is older than CUDA"),
    "GPU memory too small": ({"h19": {"variant": "int8"}},
                             "host 'h19': setting 'variant' = 'int8' needs 10 GB of GPU memory, "
                             "GPU 0 (NVIDIA device 0x1f99) has 6.4 GB. Fix: "),
    "malformed mirror URL": ({"h13": {"weights_mode": "mirror", "weights_mirror": "lab/models"}},
                             "host 'h13': setting 'weights_mirror' = 'lab/models' is not a valid "
                             "URL. Fix: "),
    "missing SSH key": ({"h13": {"ssh_key": str(LAB / "ssh" / "id_gone")}},
                        f"host 'h13': setting 'ssh_key' = '{LAB / 'ssh' / 'id_gone'}' names no "
                        "file on this machine. Fix: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inventory_stops_before_any_host_is_touched(lab, faults, case):
    bad, message = BAD[case]
    # h19: a 6 GiB GPU whose PCI id data/compat.toml lacks, described by its settings.
    hosts = {**{h: dict(d) for h, d in FRESH.items()},
             "h19": {"variant": "int4", "gpu_compute_cap": "8.6", "gpu_memory_mib": 6144}}
    for host, data in bad.items():
        hosts[host] = {**hosts[host], **data}
    inv = inventory("bad", hosts)
    before = snapshots(hosts)
    run = lab.deploy(inventory=inv)
    out = run.stdout
    assert run.returncode != 0, out[-4000:]
    assert message in out.replace("\n", " "), out[-4000:]
    assert "Fix: " in out
    # No operation ran anywhere, nothing was downloaded, no disk changed.
    assert "--> Beginning operation run" not in out and "Starting operation" not in out, out[-3000:]
    assert seafile("GET", "stats")["requests"] == 0
    assert changed(before, snapshots(hosts)) == {}
