"""Throwaway Debian hosts: an overlay of the cached rootfs per host, of two kinds.

- "sshd" (the default): sshd as PID 1 of its own mount/uts/ipc/pid namespaces, reached on
  127.0.0.1:<port>. The network stack is shared with this machine (no per-host netns), so
  the stand-ins listening on loopback are reachable from every host as they are from the
  control side. No init: nothing of systemd works there.
- "systemd": the rootfs plus the systemd layer (lab/rootfs.ensure_systemd_layer), booted by
  `systemd-nspawn --boot`: systemd is PID 1 and sshd one of its units, so units, restart
  policies, sandboxing and boot enablement are real. Each such host has a network namespace of
  its own with loopback only; docs/lab.md says how it is reached and reaches the stand-ins.
"""

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

FIRST_PORT = 2201


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"SSH"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"lab host sshd on port {port} did not answer within {timeout}s")


def ensure_client_key(lab_dir: Path) -> Path:
    key = lab_dir / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chatglm-lab",
                        "-f", str(key)], check=True)
    return key


def start_host(name: str, port: int, rootfs: Path, lab_dir: Path, gpu: dict | None = None) -> dict:
    """Mount a fresh overlay and start sshd for one host; return its record."""
    base = lab_dir / "hosts" / name
    upper, work, merged = base / "upper", base / "work", base / "root"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={rootfs},upperdir={upper},workdir={work}", str(merged)], check=True)

    (merged / "etc/hostname").write_text(name + "\n")
    (merged / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
    (merged / "etc/resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
    sim_mounts = _simulate_gpu(base / "sim", merged, gpu) if gpu else ""

    host_key = merged / "etc/ssh/ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    client_pub = (ensure_client_key(lab_dir).with_suffix(".pub")).read_text()
    ssh_dir = merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(client_pub)
    (merged / "etc/ssh/sshd_config.d/lab.conf").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nUseDNS no\nMaxSessions 50\nMaxStartups 50\n")

    pubkey = (host_key.with_suffix(".pub")).read_text().split()
    return {"name": name, "port": port, "pid": _boot(name, port, base, merged, sim_mounts),
            "dir": str(base), "root": str(merged), "gpu": gpu,
            "known_host": f"[127.0.0.1]:{port} {pubkey[0]} {pubkey[1]}"}


def _boot(name: str, port: int, base: Path, merged: Path, sim_mounts: str) -> int:
    """sshd as PID 1 of new namespaces over the host's mounted overlay; returns its pid."""
    script = (
        f"hostname {name}; mount -t sysfs -o ro sysfs {merged}/sys; "
        f"mount -t tmpfs tmpfs {merged}/run; mkdir -p {merged}/run/sshd; "
        f"mount -t tmpfs tmpfs {merged}/dev/shm; "
        f"mount -t devpts -o newinstance,ptmxmode=0666 devpts {merged}/dev/pts; "
        f"mount --bind {merged}/dev/pts/ptmx {merged}/dev/ptmx; "
        f"{sim_mounts}"
        f"exec chroot {merged} /usr/sbin/sshd -D -e"
    )
    log = open(base / "sshd.log", "ab")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
         f"--mount-proc={merged}/proc", "sh", "-c", script],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    _wait_port(port)
    return proc.pid


def power_off(record: dict) -> None:
    """Pull the plug: every process of the host dies at once; its disk (overlay) stays."""
    if record.get("kind") == "systemd":
        return _systemd_power_off(record)
    pid = record["pid"]
    if _alive(pid):
        # --kill-child forwards SIGKILL to the namespace's PID 1, ending every process in it.
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)


def power_on(record: dict) -> dict:
    """Boot a powered-off host again on the same disk, port and host key."""
    if record.get("kind") == "systemd":
        return {**record, **_boot_systemd(record)}
    base, merged = Path(record["dir"]), Path(record["root"])
    sim_mounts = _simulate_gpu(base / "sim", merged, record["gpu"]) if record.get("gpu") else ""
    return {**record, "pid": _boot(record["name"], record["port"], base, merged, sim_mounts)}


def _simulate_gpu(sim: Path, merged: Path, gpu: dict) -> str:
    """Files that make a host look like it has an NVIDIA GPU; return the shell that
    bind-mounts them over sysfs/procfs inside the host's mount namespace.

    + gpu: {"gpus": [{name, memory_mib, compute_cap, pci}], "kernel_module_version": "580.95.05"
      or absent (no module loaded), "secure_boot": bool}
    """
    # The nvidia-smi stand-in of the lab's apt repo reads this file.
    (merged / "etc/lab-gpu").mkdir(exist_ok=True)
    (merged / "etc/lab-gpu/gpus.json").write_text(json.dumps(gpu))
    mounts = []
    pci = sim / "pci"
    for i, card in enumerate(gpu.get("gpus", [])):
        dev = pci / f"0000:{i + 1:02x}:00.0"
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "vendor").write_text("0x10de\n")
        (dev / "device").write_text(card.get("device_id", "0x2330") + "\n")
        (dev / "class").write_text("0x030200\n")
    pci.mkdir(parents=True, exist_ok=True)
    mounts.append(f"mount --bind {pci} {merged}/sys/bus/pci/devices")
    if gpu.get("kernel_module_version"):
        drv = sim / "proc-driver"
        (drv / "nvidia").mkdir(parents=True, exist_ok=True)
        (drv / "nvidia" / "version").write_text(
            f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {gpu['kernel_module_version']}  "
            "Release Build  (lab)\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
        mounts.append(f"mount --bind {drv} {merged}/proc/driver")
    if "secure_boot" in gpu:
        efivars = sim / "firmware" / "efi" / "efivars"
        efivars.mkdir(parents=True, exist_ok=True)
        (efivars / "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c").write_bytes(
            bytes([6, 0, 0, 0, 1 if gpu["secure_boot"] else 0]))
        mounts.append(f"mount --bind {sim / 'firmware'} {merged}/sys/firmware")
    return "".join(m + "; " for m in mounts)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_host(record: dict) -> None:
    """Kill the host's namespace (sshd is its PID 1), unmount and delete it."""
    if record.get("kind") == "systemd":
        return stop_systemd_host(record)
    power_off(record)
    merged = record["root"]
    if subprocess.run(["mountpoint", "-q", merged]).returncode == 0:
        if subprocess.run(["umount", merged], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", merged], check=True)
    subprocess.run(["rm", "-rf", "--one-file-system", record["dir"]], check=True)


def disk_snapshot(record: dict) -> dict:
    """Everything a host's processes ever wrote to its disk: the overlay's upper layer (the
    image below it is shared and read-only), as {path: (type, mode, uid, gid, size, mtime,
    ctime, xattrs, sha256 or link target)}. Equal snapshots mean byte-identical disks."""
    upper = Path(record["dir"]) / "upper"
    snap = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                body = digest.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = st.st_rdev  # 0:0 character devices are overlay whiteouts (deletions)
            xattrs = sorted((a, os.getxattr(path, a, follow_symlinks=False))
                            for a in os.listxattr(path, follow_symlinks=False))
            snap[str(path.relative_to(upper))] = (
                kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                st.st_mtime_ns, st.st_ctime_ns, tuple(xattrs), body)
    return snap


# --- systemd hosts ---------------------------------------------------------------------------

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


def start_systemd_host(name: str, port: int, rootfs: Path, layer: Path, lab_dir: Path,
                       relay_ports: list[int]) -> dict:
    """Mount a fresh overlay of rootfs + the systemd layer and boot it; return its record.

    + port: the control side's loopback port that forwards to the host's sshd (port 22 in its
      own network namespace)
    + relay_ports: loopback ports of the stand-ins, made to answer on the same ports inside
      the host's network namespace
    """
    base = lab_dir / "hosts" / name
    upper, work, merged = base / "upper", base / "work", base / "root"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={layer}:{rootfs},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    (merged / "etc/hostname").write_text(name + "\n")
    (merged / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
    # No resolver inside: the host has loopback only, and every upstream is a 127.0.0.1 relay.
    (merged / "etc/resolv.conf").write_text("")
    host_key = merged / "etc/ssh/ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    ssh_dir = merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(ensure_client_key(lab_dir).with_suffix(".pub").read_text())
    (merged / "etc/ssh/sshd_config.d/lab.conf").write_text(
        "Port 22\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nUseDNS no\nMaxSessions 50\nMaxStartups 50\n")
    pubkey = host_key.with_suffix(".pub").read_text().split()
    # Names that are global on this machine carry the port, which carries the lab's offset:
    # two labs (worktrees) may both have an h30.
    record = {"name": name, "port": port, "kind": "systemd", "dir": str(base), "root": str(merged),
              "gpu": None, "netns": f"chatglm-lab-{port}", "cgroup": f"chatglm-lab-{port}",
              "relay_ports": list(relay_ports),
              "known_host": f"[127.0.0.1]:{port} {pubkey[0]} {pubkey[1]}"}
    return {**record, **_boot_systemd(record)}


def _helper(argv: list[str], log) -> int:
    return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True).pid


def _boot_systemd(record: dict) -> dict:
    """Boot the host: its netns (loopback up), the relays, systemd-nspawn, the SSH forward;
    returns {"pid": nspawn's pid, "helpers": [socat pids]} once sshd answers."""
    base, ns, port = Path(record["dir"]), record["netns"], record["port"]
    if not Path(f"/run/netns/{ns}").exists():
        subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    log = open(base / "boot.log", "ab")
    helpers = []
    for relay in record["relay_ports"]:
        # Unix sockets live in the file system, which both namespaces share: the stand-in's
        # port inside the netns leads to its port here, and nowhere else.
        sock = base / f"relay-{relay}.sock"
        helpers.append(_helper(["socat", f"UNIX-LISTEN:{sock},fork,unlink-early",
                                f"TCP:127.0.0.1:{relay}"], log))
        helpers.append(_helper(["ip", "netns", "exec", ns, "socat",
                                f"TCP-LISTEN:{relay},bind=127.0.0.1,reuseaddr,fork",
                                f"UNIX-CONNECT:{sock}"], log))
    # The container in a cgroup of its own in both hierarchies: parallel --keep-unit
    # containers sharing one cgroup made systemd units fail with status=219/CGROUP.
    cgroups = "".join(f"mkdir -p {root}/{record['cgroup']}; echo $$ > {root}/{record['cgroup']}/cgroup.procs; "
                      for root in CGROUP_ROOTS)
    # --register=no --keep-unit: this machine's PID 1 is not systemd (no system bus to register with).
    nspawn = subprocess.Popen(
        ["sh", "-c", f"{cgroups}exec systemd-nspawn --boot -q -D {record['root']} "
                     f"--machine={record['name']} --register=no --keep-unit "
                     f"--network-namespace-path=/run/netns/{ns} --console=read-only"],
        stdout=open(base / "console.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    helpers.append(_helper(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                            f"EXEC:ip netns exec {ns} socat STDIO TCP\\:127.0.0.1\\:22"], log))
    _wait_port(port, timeout=90.0)
    return {"pid": nspawn.pid, "helpers": helpers}


def _cgroup_pids(record: dict) -> set[int]:
    pids = set()
    for root in CGROUP_ROOTS:
        top = root / record["cgroup"]
        if top.is_dir():
            for procs in top.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    pass
    return pids


def _kill_helpers(record: dict) -> None:
    for pid in record.get("helpers", []):
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _systemd_power_off(record: dict) -> None:
    """Every process of the host (its cgroup: nspawn, systemd and all it started) killed at once."""
    for _ in range(50):
        pids = _cgroup_pids(record)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _kill_helpers(record)
    deadline = time.time() + 10
    while _alive(record["pid"]) and time.time() < deadline:
        time.sleep(0.05)


def stop_systemd_host(record: dict) -> None:
    """Shut the host down (SIGTERM to nspawn halts its systemd), then whatever is left is
    killed; unmount, delete its netns, cgroups and directory."""
    if record.get("pid") and _alive(record["pid"]):
        os.kill(record["pid"], signal.SIGTERM)
        deadline = time.time() + 15
        while _alive(record["pid"]) and time.time() < deadline:
            time.sleep(0.1)
    _systemd_power_off(record)
    merged = record["root"]
    if subprocess.run(["mountpoint", "-q", merged]).returncode == 0:
        if subprocess.run(["umount", merged], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", merged], check=True)
    if Path(f"/run/netns/{record['netns']}").exists():
        subprocess.run(["ip", "netns", "del", record["netns"]], check=True)
    for root in CGROUP_ROOTS:
        top = root / record["cgroup"]
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            top.rmdir()
    subprocess.run(["rm", "-rf", "--one-file-system", record["dir"]], check=True)
