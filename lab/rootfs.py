"""The cached Debian 12 root filesystem every lab host is an overlay of.

Built once with debootstrap, then prepared for SSH access. The .debs the
deploy installs are downloaded into the image's apt archive, so each host's
real `apt-get install` unpacks them without fetching them again.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
# What makes a host reachable by pyinfra over SSH.
BASE_PACKAGES = ["openssh-server", "python3", "iproute2", "ca-certificates"]
# What the deploy itself installs; pre-fetched, never pre-installed.
DEPLOY_PACKAGES = [
    "git", "git-lfs", "gcc", "libc6-dev", "libgomp1", "python3-venv",
    "python3-dev", "pciutils", "curl", "kmod", "gnupg", "procps",
    "initramfs-tools", "aria2",
]
VERSION = hashlib.sha256(
    " ".join([SUITE, *BASE_PACKAGES, "|", *DEPLOY_PACKAGES, "v3"]).encode()
).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("CHATGLM_LAB_CACHE", Path.home() / ".cache" / "chatglm-lab"))


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def _run(cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


def _chroot(root: Path, script: str):
    _run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        _run(["chroot", str(root), "sh", "-ec", script],
             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                  "LC_ALL": "C"})
    finally:
        _run(["umount", "-l", str(root / "proc")])


def ensure_rootfs(log=print) -> Path:
    """Return the prepared rootfs, building it when missing or outdated."""
    root = cache_dir() / f"rootfs-{SUITE}-{VERSION}"
    if (root / ".lab-ready").exists():
        return root
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install -y debootstrap")
    staging = root.with_name(root.name + ".partial")
    if staging.exists():
        subprocess.run(["umount", "-l", str(staging / "proc")], stderr=subprocess.DEVNULL)
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    log(f"lab: debootstrap {SUITE} into {staging} (about a minute, once)")
    _run(["debootstrap", "--variant=minbase", SUITE, str(staging), debian_mirror()],
         stdout=subprocess.DEVNULL)
    # Package scripts must not start services on the build machine.
    policy = staging / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", staging / "etc/resolv.conf")
    log("lab: installing sshd and python3, pre-fetching the deploy's packages")
    _chroot(staging, f"""
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends {' '.join(BASE_PACKAGES)} >/dev/null
        apt-get clean
        apt-get install -y -qq --download-only --no-install-recommends {' '.join(DEPLOY_PACKAGES)} >/dev/null
    """)
    for key in (staging / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Keeps each host's upper layer small: apt would rewrite its binary caches.
    (staging / "etc/apt/apt.conf.d/01lab-nocache").write_text(
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')
    (staging / ".lab-ready").write_text(VERSION + "\n")
    staging.rename(root)
    for old in cache_dir().glob(f"rootfs-{SUITE}-*"):
        if old != root and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    return root


# The layer that makes a host boot systemd as PID 1 (lab/hosts.py, kind "systemd"): systemd,
# its init symlinks and a system bus, installed over the rootfs once and cached beside it. The
# hosts that use it mount it between the rootfs and their own upper layer.
SYSTEMD_PACKAGES = ["systemd", "systemd-sysv", "dbus"]
LAYER_VERSION = hashlib.sha256(" ".join([VERSION, *SYSTEMD_PACKAGES, "v1"]).encode()).hexdigest()[:12]


def ensure_systemd_layer(rootfs: Path, log=print) -> Path:
    """Return the systemd layer for rootfs (a directory to stack as an overlay lower layer),
    building it when missing.

    Built like the rootfs: an overlay over it whose upper directory becomes the layer, apt
    in a chroot (policy-rc.d stays, so no package script starts a service here). apt's lists
    are refreshed for systemd, so the deploy's packages are fetched again into the layer's
    archive: the host's `apt-get install` must find the versions its lists name without a
    network (a systemd host has loopback only). ssh.service is enabled, for sshd runs as a unit.
    """
    layer = cache_dir() / f"systemd-layer-{LAYER_VERSION}"
    if (layer / ".lab-ready").exists():
        return layer / "tree"
    staging = layer.with_name(layer.name + ".partial")
    merged = staging / "merged"
    if staging.exists():
        for mount in (merged / "proc", merged):
            subprocess.run(["umount", "-l", str(mount)], stderr=subprocess.DEVNULL)
        shutil.rmtree(staging)
    for d in ("tree", "work", "merged"):
        (staging / d).mkdir(parents=True)
    log(f"lab: building the systemd layer in {staging} (once)")
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={rootfs},upperdir={staging / 'tree'},workdir={staging / 'work'}", str(merged)])
    try:
        _chroot(merged, f"""
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends {' '.join(SYSTEMD_PACKAGES)} >/dev/null
            apt-get clean
            apt-get install -y -qq --download-only --no-install-recommends {' '.join(DEPLOY_PACKAGES)} >/dev/null
            systemctl enable ssh.service
            # Nothing on a lab host needs a login prompt on the container's console.
            systemctl mask console-getty.service getty@tty1.service
        """)
    finally:
        _run(["umount", str(merged)])
    shutil.rmtree(staging / "work")
    (staging / "merged").rmdir()
    (staging / ".lab-ready").write_text(LAYER_VERSION + "\n")
    staging.rename(layer)
    return layer / "tree"
