"""GPU detection, the GPU stack plan, and the NVIDIA driver + CUDA toolkit + cuDNN.

The manual route's failures are what this stage prevents: a driver upgraded under
a loaded kernel module ("Driver/library version mismatch"), a toolkit newer than the
driver, a module that Secure Boot will not load. Packages come from NVIDIA's CUDA
apt repo (cuda-keyring), are pinned to the resolved versions and held.
"""

import dataclasses
from io import StringIO

from pyinfra import host
from pyinfra.api import StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files

from facts.gpu import (AptHolds, AptKnowsRepo, CudaToolkits, DriverLibraries, KernelModule,
                       LEGACY_KEY, LegacyCudaKey, NvidiaPciDevices, NvidiaSmi, SecureBoot)

from .common import fail
from .resolver import GpuPlan, resolve, version_tuple
from .settings import SettingError, Settings, load_toml

def gpu_plan(s: Settings, os_ident: str) -> GpuPlan:
    """Detect this host's GPUs and resolve its stack; raises SettingError if impossible."""
    pci = host.get_fact(NvidiaPciDevices)
    smi = host.get_fact(NvidiaSmi)
    libs = host.get_fact(DriverLibraries)
    gpus = list(smi["gpus"])
    if pci and not gpus:
        # On the bus but not visible to a driver yet: name it from its PCI id.
        known = load_toml("compat.toml")["pci"]
        for p in pci:
            card = known.get(p["device"])
            if card is None and not s.gpu_compute_cap:
                raise SettingError(host.name, "gpu_compute_cap", f"is needed: PCI device "
                                   f"{p['device']} is not in data/compat.toml [pci] and no driver "
                                   "reports its compute capability",
                                   "set gpu_compute_cap (e.g. '9.0' for H100) and gpu_memory_mib, "
                                   "or add the id to data/compat.toml")
            gpus.append({"name": card["name"] if card else f"NVIDIA device {p['device']}",
                         "memory_mib": s.gpu_memory_mib or (card or {}).get("memory_mib", 0),
                         "compute_cap": s.gpu_compute_cap or card["compute_cap"]})
    installed = smi["driver"] or next((lib["version"] for lib in libs if lib["version"]), "")
    pins = {"cuda_version": s.cuda_version, "driver_branch": s.driver_branch, "cudnn": s.cudnn}
    plan = resolve(host.name, gpus, os_ident, pins, installed_driver=installed)
    return dataclasses.replace(plan, gpus=gpus, smi_error=smi["error"], installed_driver=installed)


@operation(is_idempotent=False)
def report_plan(summary: str):
    """
    Show the resolved GPU stack in the run output; changes nothing.

    + summary: the plan in one line (GpuPlan.summary)
    """
    host.noop(summary)
    return
    yield


@operation(is_idempotent=False)
def secure_boot(keep_driver: bool, module_signed: bool):
    """
    Stop before installing a driver whose unsigned module Secure Boot would refuse.

    + keep_driver: the installed driver stays (nothing is built)
    + module_signed: the inventory says a MOK is enrolled and DKMS signs the module
    """
    if keep_driver or module_signed:
        host.noop("Secure Boot is no obstacle: the driver is kept or its module is signed")
        return
    if host.get_fact(SecureBoot):
        yield fail(
            "Secure Boot is enabled and the NVIDIA module DKMS builds is unsigned, so it would "
            "not load. Fix: enroll a Machine Owner Key (mokutil --import, confirm at the next "
            "boot) and set secure_boot_module_signed=True for this host, or disable Secure Boot")
        return
    host.noop("Secure Boot is off")
    return
    yield


def _packages_needed(keep_driver: bool, driver_branch: str, cuda: str, cudnn: str) -> list[str]:
    installed = host.get_fact(DebPackages)
    toolkits = host.get_fact(CudaToolkits)["installed"]
    needed = []
    if not keep_driver:
        needed.append(f"cuda-drivers-{driver_branch}")
    if cuda not in toolkits:
        needed.append(f"cuda-toolkit-{cuda.replace('.', '-')}")
    name, _, version = cudnn.partition("=")
    if cudnn != "none" and (name not in installed or (version and version not in installed[name])):
        needed.append(cudnn)
    return needed


@operation()
def cuda_repo(repo_distro: str, cuda_repo_url: str, keep_driver: bool, driver_branch: str,
              cuda: str, cudnn: str):
    """
    Set up NVIDIA's CUDA apt repo through cuda-keyring, when a package must come from it.

    + repo_distro: NVIDIA's directory for the OS, e.g. ubuntu2404
    + cuda_repo_url: NVIDIA's URL or a mirror of it
    + keep_driver, driver_branch, cuda, cudnn: the planned stack (what may be missing)
    """
    if not _packages_needed(keep_driver, driver_branch, cuda, cudnn):
        host.noop("driver, toolkit and cuDNN are in place: the CUDA repo is not needed")
        return
    base = f"{cuda_repo_url.rstrip('/')}/{repo_distro}/x86_64"
    # Read before anything runs: pyinfra executes each yielded command before resuming here.
    keyring_missing = "cuda-keyring" not in host.get_fact(DebPackages)
    lists_missing = not host.get_fact(AptKnowsRepo, url=base)
    if host.get_fact(LegacyCudaKey):
        yield f"apt-key del {LEGACY_KEY}"
    if keyring_missing:
        yield from apt.deb._inner(src=f"{base}/cuda-keyring_1.1-1_all.deb")
    # Written by us as well, so a mirror URL wins over the one inside the keyring .deb.
    line = (f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {base}/ /\n")
    put = files.put._inner(src=StringIO(line), mode="644",
                           dest=f"/etc/apt/sources.list.d/cuda-{repo_distro}-x86_64.list")
    changed = False
    for command in put:
        changed = True
        yield command
    if changed or keyring_missing or lists_missing:
        yield from apt.update._inner()


@operation()
def nouveau():
    """
    Blacklist nouveau so the NVIDIA module can bind, and rebuild the initramfs (gpu.module
    reboots when the host must).
    """
    text = "# Written by chatglm-deploy: the NVIDIA driver needs the GPU.\nblacklist nouveau\noptions nouveau modeset=0\n"
    changed = False
    for command in files.put._inner(src=StringIO(text), dest="/etc/modprobe.d/blacklist-nouveau.conf",
                                    mode="644"):
        changed = True
        yield command
    if changed:
        # Hosts without an initramfs (containers, some clouds) have nothing to rebuild.
        yield ("if ls /boot/initrd.img-* >/dev/null 2>&1 && command -v update-initramfs "
               ">/dev/null; then update-initramfs -u; fi")


@operation()
def packages(keep_driver: bool, driver_branch: str, cuda: str, cudnn: str,
             installed_driver: str = "", kernel_headers: bool = True):
    """
    Install the resolved driver branch, CUDA toolkit and cuDNN; never downgrade or
    replace a driver that already satisfies the toolkit (gpu.hold pins them after).

    + keep_driver: the installed driver satisfies the toolkit and stays
    + driver_branch: the driver branch to install (or the kept one's)
    + cuda: the toolkit version, e.g. 12.4
    + cudnn: the cuDNN package (name or name=version), none for none
    + installed_driver: the installed driver's version (for the message)
    + kernel_headers: install the running kernel's headers for DKMS first
    """
    needed = _packages_needed(keep_driver, driver_branch, cuda, cudnn)
    if needed and not keep_driver and kernel_headers:
        # DKMS builds the module against the running kernel's headers.
        yield ("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
               "\"linux-headers-$(uname -r)\" "
               "|| { echo 'no linux-headers package for the running kernel '$(uname -r)'; install "
               "them or set kernel_headers=False if the module is built another way' >&2; exit 1; }")
    if needed:
        yield from apt.packages._inner(packages=needed, no_recommends=True)
    if not needed:
        host.noop(f"driver {installed_driver or driver_branch}, CUDA {cuda} and {cudnn} are installed")


@operation()
def hold(keep_driver: bool, driver_branch: str, cuda: str, cudnn: str):
    """
    Hold the planned driver, toolkit and cuDNN packages so upgrades cannot move them.

    + keep_driver: the driver was kept, not installed (not held)
    + driver_branch: the installed driver branch
    + cuda: the toolkit version
    + cudnn: the cuDNN package (name or name=version), none for none
    """
    # NVIDIA's Debian repos name the driver package without its branch.
    holds = [f"nvidia-driver-{driver_branch}", "nvidia-driver",
             f"cuda-drivers-{driver_branch}"] if not keep_driver else []
    holds.append(f"cuda-toolkit-{cuda.replace('.', '-')}")
    if cudnn != "none":
        holds.append(cudnn.split("=")[0])
    installed = host.get_fact(DebPackages)
    held = host.get_fact(AptHolds)
    # Only names dpkg knows: apt-mark fails on unknown ones (NVIDIA's Debian repos name the
    # driver package without its branch), and a toolkit from a runfile is no package.
    to_hold = [p for p in holds if p not in held and p in installed]
    if not to_hold:
        host.noop("planned packages held: " + (", ".join(p for p in holds if p in held) or "none"))
        return
    yield StringCommand("apt-mark", "hold", *to_hold)


@operation()
def cuda_link(cuda: str):
    """
    Point /usr/local/cuda at the planned toolkit.

    + cuda: the toolkit version, e.g. 12.4
    """
    toolkits = host.get_fact(CudaToolkits)
    target = toolkits["installed"].get(cuda, f"/usr/local/cuda-{cuda}")
    if toolkits["current"] == target:
        host.noop(f"/usr/local/cuda -> {target}")
        return
    yield (f"update-alternatives --set cuda {target} 2>/dev/null || ln -sfn {target} /usr/local/cuda")


@operation(is_idempotent=False)
def module(allow_reboot: bool):
    """
    Check that the loaded kernel module matches the driver libraries; cure a mismatch by
    rebooting when allowed, else fail the host with the exact fix.

    + allow_reboot: the inventory lets the deploy reboot this host
    """
    if not host.state.is_executing:
        host.noop("checked after the driver install, at execution")
        return
    loaded = host.get_fact(KernelModule)
    libs = [lib["version"] for lib in host.get_fact(DriverLibraries) if lib["version"]]
    userspace = max(libs, key=version_tuple) if libs else ""
    if not userspace:
        yield fail("no libcuda.so.1 found after the driver install: is the driver "
                             "package complete? (dpkg -L nvidia-driver-<branch>)")
        return
    if loaded == userspace:
        host.noop(f"kernel module {loaded} matches the driver libraries")
        return
    problem = (f"the loaded kernel module is {loaded}" if loaded else "no nvidia kernel module is loaded")
    if allow_reboot:
        host.noop(f"{problem}, driver libraries are {userspace}: rebooting")
        from pyinfra.operations import server  # ~70 ms of imports, for this rare path only

        yield from server.reboot._inner(delay=5, reboot_timeout=600)
        return
    if not loaded:
        yield StringCommand("sh", "-c", QuoteString(
            f"modprobe nvidia || {{ echo 'no nvidia kernel module is loaded and modprobe nvidia failed; "
            f"driver libraries are {userspace}. Fix: reboot the host (or set allow_reboot=True)' >&2; "
            "exit 1; }"))
        return
    yield fail(
        f"Driver/library version mismatch: {problem}, the driver libraries are {userspace}. "
        "Fix: reboot the host (or set allow_reboot=True), or unload and reload the module: "
        "rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && modprobe nvidia")
    return
