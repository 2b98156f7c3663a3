"""The lab: throwaway Debian hosts plus local stand-ins for every upstream the deploy uses.

    python -m lab up [--hosts N]   build what is missing, start stand-ins and hosts
    python -m lab down             stop everything the lab started, by PID; unmount
    python -m lab demo             up, deploy twice (the second must change nothing), report
    python -m lab status

State lives in .lab/ (ignored by git); slow-to-build parts (rootfs, fixtures, wheels)
are cached in ~/.cache/chatglm-lab.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import hosts as labhosts
from . import remotes
from operations.settings import STAGES

from .rootfs import cache_dir, ensure_rootfs, ensure_systemd_layer

ROOT = Path(__file__).resolve().parent.parent
LAB = Path(os.environ.get("CHATGLM_LAB_DIR", ROOT / ".lab"))
STATE = LAB / "state.json"
# CHATGLM_LAB_PORT_OFFSET lets two labs (say, two worktrees) run side by side.
OFFSET = int(os.environ.get("CHATGLM_LAB_PORT_OFFSET", "0"))
PORTS = {"seafile": 18080 + OFFSET, "www": 18081 + OFFSET, "git": 19418 + OFFSET}
# The real share tokens (docs/upstream.md §2), served from loopback.
SHARES = {"quantized": "674208019e314311ab5c", "fp16": "fb9f16d6dc8f482596c2"}
DISTROS = ("debian11", "debian12", "ubuntu2004", "ubuntu2204", "ubuntu2404")


def log(msg):
    print(f"lab: {msg}", flush=True)


def load_state() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {"hosts": [], "services": {}}


def save_state(state: dict):
    LAB.mkdir(parents=True, exist_ok=True)
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(STATE)


def _tree_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for base in paths:
        for p in sorted(base.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                digest.update(str(p.relative_to(base)).encode())
                digest.update(p.read_bytes())
    return digest.hexdigest()[:12]


def ensure_fixtures() -> dict:
    from .fixtures.build import build_fixtures

    src = ROOT / "lab" / "fixtures"
    out = cache_dir() / f"fixtures-{_tree_hash(src)}"
    manifest = out / "manifest.json"
    if not manifest.exists():
        log("building the fixture models (tiny ChatGLM-shaped, fp16/int8/int4)")
        shutil.rmtree(out, ignore_errors=True)
        result = build_fixtures(out)
        manifest.write_text(json.dumps(result, indent=1))
    return json.loads(manifest.read_text())


def ensure_wheels(requirements: Path) -> Path:
    from . import pyindex

    wheels = cache_dir() / "wheels"
    log(f"filling the package index from {requirements.name}")
    pyindex.fill(str(requirements), str(wheels))
    index = LAB / "www" / "pypi"
    shutil.rmtree(index, ignore_errors=True)
    pyindex.write_index(str(wheels), str(index))
    return index


def build_shares(fixtures: dict) -> dict:
    """Lay out the share folders like the real ones: quantized variants in sub-folders.

    The same files also go to www/models/<repo name>/, a LAN mirror for weights_mode='mirror'
    (http://127.0.0.1:<www port>/models/).
    """
    root = LAB / "share"
    mirror = LAB / "www" / "models"
    for old in (root, mirror):
        shutil.rmtree(old, ignore_errors=True)
    dirs = {}
    for variant, info in fixtures.items():
        src = Path(info["dir"])
        if variant == "fp16":
            target = root / "fp16"
        else:
            target = root / "quantized" / src.name
        for folder in (target, mirror / src.name):
            folder.mkdir(parents=True, exist_ok=True)
            for name in info["weights"]:
                os.link(src / name, folder / name)
    for kind in SHARES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        dirs[kind] = root / kind
    return dirs


def _spawn(name: str, argv: list[str]) -> dict:
    logf = open(LAB / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
    return {"pid": proc.pid, "port": PORTS[name]}


def _wait_listening(port: int, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_services(state: dict, share_dirs: dict):
    py = sys.executable
    services = {
        "seafile": [py, "-m", "lab.seafile", "--port", str(PORTS["seafile"]),
                    *sum((["--share", f"{SHARES[k]}={d}"] for k, d in share_dirs.items()), [])],
        "www": [py, "-m", "lab.pyindex", "serve", "--dir", str(LAB / "www"),
                "--port", str(PORTS["www"])],
        "git": ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={LAB / 'git'}",
                "--listen=127.0.0.1", f"--port={PORTS['git']}", str(LAB / "git")],
    }
    for name, argv in services.items():
        if name in state["services"] and labhosts._alive(state["services"][name]["pid"]):
            continue
        state["services"][name] = _spawn(name, argv)
        save_state(state)
    for name in services:
        _wait_listening(PORTS[name])


def write_inventory(state: dict, commits: dict, variants: dict, extra: dict | None = None) -> Path:
    from .local import inventory_data  # lab.local imports this module

    key = LAB / "ssh" / "id_ed25519"
    known = LAB / "ssh" / "known_hosts"
    known.write_text("".join(h["known_host"] + "\n" for h in state["hosts"]))
    common = {
        "ssh_hostname": "127.0.0.1", "ssh_user": "root", "ssh_key": str(key),
        "ssh_known_hosts_file": str(known), "ssh_strict_host_key_checking": "yes",
        "ssh_look_for_keys": False, "ssh_allow_agent": False,
        "install_dir": "/opt/chatglm",
        # The stand-ins' URLs and pins, as lab.local writes them for an @local run.
        **inventory_data(commits),
        "cuda_repo_url": f"http://127.0.0.1:{PORTS['www']}/compute/cuda/repos",
    }
    lines = ['"""Written by `python -m lab up`: the lab\'s throwaway hosts (do not edit)."""', "",
             "lab = ["]
    for h in state["hosts"]:
        data = {**common, "ssh_port": h["port"], "variant": variants.get(h["name"], "auto"),
                **(extra or {}).get(h["name"], {})}
        if h.get("kind") != "systemd":
            # No init on an sshd-as-PID-1 host: every stage but serve, unless the test says.
            data.setdefault("stages", ",".join(s for s in STAGES if s != "serve"))
        if data["variant"] == "fp16":
            # The fixture is 0.5 MB; data/models.toml's 32 GB of RAM is the real model's.
            data.setdefault("check_memory", False)
        lines.append(f"    ({h['name']!r}, {data!r}),")
    lines += ["]", "", "from operations.preflight import check_ssh_keys  # noqa: E402", "",
              "check_ssh_keys(lab)"]
    path = LAB / "inventory.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def up(n_hosts: int = 2, variants: dict | None = None, gpus: dict | None = None,
       extra: dict | None = None, systemd_hosts: tuple = ()) -> Path:
    """Bring the lab up with n_hosts fresh hosts h1..hN; return the inventory path.

    + variants: {host: variant}, default 'auto'
    + gpus: {host: simulated GPU} (see hosts._simulate_gpu)
    + extra: {host: more inventory data}
    + systemd_hosts: more hosts, named hM with M > n_hosts, that boot systemd as PID 1 in a
      network namespace of their own (hosts.start_systemd_host); on port FIRST_PORT+M-1 like
      the others
    """
    LAB.mkdir(parents=True, exist_ok=True)
    state = load_state()
    if state["hosts"]:
        log("stopping the hosts of the previous run")
        for h in state["hosts"]:
            labhosts.stop_host(h)
        state["hosts"] = []
        save_state(state)
    rootfs = ensure_rootfs(log)
    fixtures = ensure_fixtures()
    commits = remotes.build_remotes(LAB / "git", fixtures, ROOT / "lab" / "code_repo")
    share_dirs = build_shares(fixtures)
    ensure_wheels(ROOT / "data" / "requirements" / "chatglm-cpu.txt")
    from .aptrepo import build_repo

    build_repo(str(LAB / "www"), f"http://127.0.0.1:{PORTS['www']}/compute/cuda/repos",
               distros=DISTROS, gnupg_home=str(cache_dir() / "gnupg"))
    start_services(state, share_dirs)
    labhosts.ensure_client_key(LAB)
    t0 = time.time()
    for i in range(n_hosts):
        name = f"h{i + 1}"
        state["hosts"].append(labhosts.start_host(
            name, labhosts.FIRST_PORT + OFFSET + i, rootfs, LAB, gpu=(gpus or {}).get(name)))
        save_state(state)
    if systemd_hosts:
        layer = ensure_systemd_layer(rootfs, log)
        for name in systemd_hosts:
            number = int(name[1:])
            if number <= n_hosts:
                raise ValueError(f"systemd host {name} clashes with the sshd hosts h1..h{n_hosts}")
            state["hosts"].append(labhosts.start_systemd_host(
                name, labhosts.FIRST_PORT + OFFSET + number - 1, rootfs, layer, LAB,
                relay_ports=sorted(PORTS.values())))
            save_state(state)
    log(f"{n_hosts + len(systemd_hosts)} hosts up in {time.time() - t0:.2f}s")
    return write_inventory(state, commits, variants or {}, extra)


def power_cycle(name: str, off_only: bool = False) -> dict:
    """Pull the plug on one host (every process dies at once, its disk stays), then boot it
    again unless off_only; returns its new record."""
    state = load_state()
    at = next(i for i, h in enumerate(state["hosts"]) if h["name"] == name)
    record = state["hosts"][at]
    labhosts.power_off(record)
    if not off_only:
        record = state["hosts"][at] = labhosts.power_on(record)
        save_state(state)
    return record


def renew(name: str) -> dict:
    """Replace one host by a fresh one of the same name and port (a new disk and host key;
    the lab's known_hosts file learns the new key); returns its record."""
    state = load_state()
    at = next(i for i, h in enumerate(state["hosts"]) if h["name"] == name)
    old = state["hosts"][at]
    labhosts.stop_host(old)
    record = state["hosts"][at] = labhosts.start_host(name, old["port"], ensure_rootfs(log), LAB,
                                                      gpu=old.get("gpu"))
    save_state(state)
    known = LAB / "ssh" / "known_hosts"
    lines = [line for line in known.read_text().splitlines()
             if not line.startswith(f"[127.0.0.1]:{old['port']} ")]
    known.write_text("".join(line + "\n" for line in lines + [record["known_host"]]))
    return record


def down():
    state = load_state()
    for h in state["hosts"]:
        labhosts.stop_host(h)
    for name, svc in state["services"].items():
        if labhosts._alive(svc["pid"]):
            os.killpg(svc["pid"], signal.SIGTERM)
            deadline = time.time() + 5
            while labhosts._alive(svc["pid"]) and time.time() < deadline:
                time.sleep(0.05)
            if labhosts._alive(svc["pid"]):
                os.killpg(svc["pid"], signal.SIGKILL)
    save_state({"hosts": [], "services": {}})
    log("down: hosts and stand-ins stopped")


def pyinfra(inventory: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("pyinfra")
    cmd = [str(exe), "-y", str(inventory), "deploy.py", *args]
    return subprocess.run(cmd, cwd=ROOT, check=check)


def demo(n_hosts: int = 3):
    t0 = time.time()
    # h1 'auto' (int4 on a CPU host), h2 int8, h3 fp16: every variant once.
    inventory = up(n_hosts, variants={"h2": "int8", "h3": "fp16"})
    t1 = time.time()
    log(f"deploying to {n_hosts} hosts: pyinfra -y {inventory} deploy.py")
    pyinfra(inventory)
    t2 = time.time()
    log("deploying again: every operation must report no change")
    pyinfra(inventory)
    t3 = time.time()
    report = ROOT / "reports" / "fleet.md"
    if report.exists():
        print(report.read_text())
    log(f"lab up {t1 - t0:.1f}s, first deploy {t2 - t1:.1f}s, rerun {t3 - t2:.1f}s")
    log(f"report: {report} (chart: {report.with_suffix('.svg')}); hosts stay up (ssh via {inventory}); `python -m lab down` stops them")


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--systemd", default="", help="comma-separated systemd hosts, e.g. h30,h31")
    sub.add_parser("down")
    sub.add_parser("status")
    p_demo = sub.add_parser("demo")
    p_demo.add_argument("--hosts", type=int, default=3)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the lab needs root (mounts, namespaces)")
    if args.cmd == "up":
        print(up(args.hosts, systemd_hosts=tuple(filter(None, args.systemd.split(",")))))
    elif args.cmd == "down":
        down()
    elif args.cmd == "status":
        print(json.dumps(load_state(), indent=1))
    elif args.cmd == "demo":
        demo(args.hosts)
