"""Base system: the OS packages every later stage relies on."""

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import apt

from facts.system import MissingDebs, OsRelease

from .settings import SettingError

SUPPORTED = {("ubuntu", 20), ("ubuntu", 22), ("ubuntu", 24), ("debian", 11), ("debian", 12)}
PACKAGES = ["git", "git-lfs", "gcc", "libc6-dev", "libgomp1", "python3-venv", "pciutils",
            "curl", "ca-certificates", "kmod", "gnupg", "procps"]


def os_id() -> str:
    release = host.get_fact(OsRelease)
    return f"{release.get('ID', '').lower()}-{release.get('VERSION_ID', '')}"


def check_supported() -> str:
    """Stop on an OS the deploy was not built for; return its id ('debian-12')."""
    ident = os_id()
    name, _, version = ident.partition("-")
    if (name, int(version.split(".")[0] or 0)) not in SUPPORTED:
        raise SettingError(host.name, "os", f"{ident!r} is not supported",
                           "use Ubuntu 20.04/22.04/24.04 or Debian 11/12")
    return ident


@operation()
def base_packages(extra: list[str] | None = None):
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
