"""Base system: the OS packages every later stage relies on."""

import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt

from .settings import SettingError

SUPPORTED = {("ubuntu", 20), ("ubuntu", 22), ("ubuntu", 24), ("debian", 11), ("debian", 12)}
PACKAGES = ["git", "git-lfs", "gcc", "libc6-dev", "libgomp1", "python3-venv", "pciutils",
            "curl", "ca-certificates", "kmod", "gnupg", "procps"]


class CpuCount(FactBase):
    """Number of online CPUs."""

    def command(self):
        return "nproc"

    @staticmethod
    def default():
        return 1

    def process(self, output):
        return int(output[0])


class MemoryBytes(FactBase):
    """Total RAM of the host in bytes (MemTotal)."""

    def command(self):
        return "awk '/^MemTotal:/{print $2 * 1024}' /proc/meminfo"

    @staticmethod
    def default():
        return 0

    def process(self, output):
        return int(float(output[0]))


class HostResources(FactBase):
    """{"cpus": online CPUs, "ram_bytes": MemTotal}: CpuCount and MemoryBytes in one command,
    read once at collection for the stages that need them."""

    def command(self):
        return "nproc; awk '/^MemTotal:/{print $2 * 1024}' /proc/meminfo"

    @staticmethod
    def default():
        return {"cpus": 1, "ram_bytes": 0}

    def process(self, output):
        return {"cpus": int(output[0]), "ram_bytes": int(float(output[1]))}


class FreeDiskBytes(FactBase):
    """Bytes available to root on the filesystem holding the deepest existing parent of path."""

    def command(self, path):
        return (f"p={path}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; "
                "df -B1 --output=avail \"$p\" | tail -1")

    @staticmethod
    def default():
        return 0

    def process(self, output):
        return int(output[-1].strip())


def os_id() -> str:
    distro = host.get_fact(LinuxDistribution)
    name = (distro.get("release_meta") or {}).get("ID", (distro["name"] or "")).lower()
    version = (distro.get("release_meta") or {}).get("VERSION_ID", str(distro["major"]))
    return f"{name}-{version}"


def check_supported() -> str:
    """Stop on an OS the deploy was not built for; return its id ('debian-12')."""
    ident = os_id()
    name, _, version = ident.partition("-")
    if (name, int(version.split(".")[0] or 0)) not in SUPPORTED:
        raise SettingError(host.name, "os", f"{ident!r} is not supported",
                           "use Ubuntu 20.04/22.04/24.04 or Debian 11/12")
    return ident


class MissingDebs(FactBase):
    """Which of the given Debian packages dpkg does not have installed (one dpkg-query,
    where apt.packages reads the whole `dpkg -l`)."""

    def command(self, packages):
        names = " ".join(shlex.quote(p) for p in packages)
        return (f"echo want {names}; "
                f"dpkg-query -W -f='${{db:Status-Abbrev}} ${{Package}}\\n' {names} 2>/dev/null; true")

    @staticmethod
    def default():
        return []

    def process(self, output):
        want = output[0].split()[1:]
        installed = {line.split()[1] for line in output[1:]
                     if len(line.split()) == 2 and line.startswith("ii")}
        return [p for p in want if p not in installed]


@operation()
def base_packages(extra=None):
    """
    Install the OS packages the deploy needs (git, git-lfs, gcc, python3-venv ...).

    + extra: more package names to install

    One dpkg query when all are installed; otherwise apt's lists are refreshed (when older
    than a day) and the missing packages installed.
    """
    packages = PACKAGES + list(extra or [])
    missing = host.get_fact(MissingDebs, packages=packages)
    if not missing:
        host.noop(f"{len(packages)} base packages installed")
        return
    yield from apt.update._inner(cache_time=24 * 3600)
    yield from apt.packages._inner(packages=packages, no_recommends=True)
