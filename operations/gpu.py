"""GPU detection, the GPU stack plan, and the NVIDIA driver + CUDA toolkit + cuDNN.

The manual route's failures are what this stage prevents: a driver upgraded under
a loaded kernel module ("Driver/library version mismatch"), a toolkit newer than the
driver, a module that Secure Boot will not load. Packages come from NVIDIA's CUDA
apt repo (cuda-keyring), are pinned to the resolved versions and held.
"""

import re

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files

from .common import fail
from .resolver import resolve, version_tuple
from .settings import SettingError, Settings, load_toml

NVIDIA_VENDOR = "0x10de"
LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64",
            "/usr/lib/wsl/lib", "/usr/local/nvidia/lib"]
LEGACY_KEY = "7fa2af80"
# apt-cache that writes nothing to disk: no package cache files, scratch files in RAM
# (a fact must leave the host as it was, or --dry would change it).
APT_CACHE_READONLY = ("TMPDIR=$([ -w /dev/shm ] && echo /dev/shm || echo \"${TMPDIR:-/tmp}\") "
                      "apt-cache -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=")


class NvidiaPciDevices(FactBase):
    """NVIDIA display/3D controllers on the PCI bus, read from sysfs (needs no lspci)."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        # Read by the shell itself, no process: this runs on every host at every run.
        return ("for d in /sys/bus/pci/devices/*; do "
                "{ read -r v < \"$d/vendor\" && "
                f"[ \"$v\" = {NVIDIA_VENDOR} ] && read -r c < \"$d/class\" && "
                "read -r i < \"$d/device\"; } 2>/dev/null || continue; "
                "case $c in 0x03*) echo \"${d##*/} $i\";; esac; done; true")

    @staticmethod
    def default():
        return []

    def process(self, output):
        return [dict(zip(("pci", "device"), line.split())) for line in output]


class NvidiaSmi(FactBase):
    """GPUs as the driver sees them: name, memory, compute capability, driver version.

    Returns {"gpus": [...], "driver": str, "error": str, "installed": bool}; error holds
    nvidia-smi's own message when it fails (no kernel module, version mismatch).
    """

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return ("if command -v nvidia-smi >/dev/null; then "
                "nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version "
                "--format=csv,noheader,nounits 2>&1; echo \"rc=$?\"; fi")

    @staticmethod
    def default():
        return {"gpus": [], "driver": "", "error": "", "installed": False}

    def process(self, output):
        rc = output[-1].removeprefix("rc=")
        lines = output[:-1]
        if rc != "0":
            return {"gpus": [], "driver": "", "error": " ".join(lines), "installed": True}
        gpus, driver = [], ""
        for line in lines:
            name, mem, cap, driver = [p.strip() for p in line.split(",")]
            gpus.append({"name": name, "memory_mib": int(float(mem)), "compute_cap": cap})
        return {"gpus": gpus, "driver": driver, "error": "", "installed": True}


class KernelModule(FactBase):
    """Version of the loaded nvidia kernel module, '' when none is loaded."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return "cat /proc/driver/nvidia/version 2>/dev/null || true"

    @staticmethod
    def default():
        return ""

    def process(self, output):
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", " ".join(output))
        return match.group(1) if match else ""


class DriverLibraries(FactBase):
    """Userspace driver libraries: [{"path": realpath of libcuda.so.1, "version": ...}],
    from the ld.so cache and the directories drivers are known to use."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        dirs = " ".join(LIB_DIRS)
        # A host with no libcuda in the known directories nor in the ld.so cache (every
        # CPU host) costs one grep instead of ldconfig, sed, readlink and sort.
        return (f"found=; for d in {dirs}; do [ -e $d/libcuda.so.1 ] && found=1; done; "
                "[ -n \"$found\" ] || ! grep -qs 'libcuda\\.so\\.1' /etc/ld.so.cache || found=1; "
                "[ -z \"$found\" ] || { { ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\\.so\\.1 .*=> //p'; "
                f"for d in {dirs}; do [ -e $d/libcuda.so.1 ] && echo $d/libcuda.so.1; done; }} "
                "| while read -r p; do echo \"$p $(readlink -f $p)\"; done | sort -u; }")

    @staticmethod
    def default():
        return []

    def process(self, output):
        libs, seen = [], set()
        for line in output:
            link, real = line.split()
            if real in seen:
                continue
            seen.add(real)
            match = re.search(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)$", real)
            libs.append({"link": link, "path": real, "version": match.group(1) if match else ""})
        return libs


class SecureBoot(FactBase):
    """True/False when the firmware reports Secure Boot, None on legacy BIOS boots."""

    def command(self):
        return ("if command -v mokutil >/dev/null && mokutil --sb-state 2>/dev/null | "
                "grep -q 'SecureBoot enabled'; then echo on; "
                "else f=$(ls /sys/firmware/efi/efivars/SecureBoot-* 2>/dev/null | head -1); "
                "if [ -n \"$f\" ]; then od -An -t u1 \"$f\" | awk '{print ($NF==1) ? \"on\" : \"off\"}'; "
                "else echo none; fi; fi")

    @staticmethod
    def default():
        return None

    def process(self, output):
        return {"on": True, "off": False}.get(output[-1].strip())


class CudaToolkits(FactBase):
    """Installed toolkits {"12.4": "/usr/local/cuda-12.4"} and where /usr/local/cuda points.

    A toolkit is a /usr/local/cuda-X.Y directory holding its runtime library, whether it
    came from apt, a runfile or an image (version.json is not always there).
    """

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return ("for d in /usr/local/cuda-[0-9]*.[0-9]*; do "
                "ls $d/lib64/libcudart.so* $d/targets/*/lib/libcudart.so* >/dev/null 2>&1 && "
                "echo \"$(readlink -f $d)\"; done; echo \"current $(readlink -f /usr/local/cuda)\"")

    @staticmethod
    def default():
        return {"installed": {}, "current": ""}

    def process(self, output):
        installed, current = {}, ""
        for line in output:
            if line.startswith("current "):
                current = line[len("current "):].strip()
                continue
            match = re.search(r"cuda-(\d+\.\d+)$", line.strip())
            if match:
                installed[match.group(1)] = line.strip()
        return {"installed": installed, "current": current}


class AptHolds(FactBase):
    """Packages marked hold (dpkg's selections, which apt-mark hold sets; read from dpkg
    because apt-mark writes scratch files even to show them)."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self):
        return ("dpkg-query -W -f='${db:Status-Want} ${Package}\\n' 2>/dev/null "
                "| awk '$1 == \"hold\" {print $2}' || true")

    @staticmethod
    def default():
        return []

    def process(self, output):
        return [line.strip() for line in output if line.strip()]


class AptKnowsRepo(FactBase):
    """Whether apt's package lists include a repository URL (an update fetched it)."""

    def command(self, url):
        return f"{APT_CACHE_READONLY} policy 2>/dev/null | grep -qF '{url}' && echo yes || echo no"

    @staticmethod
    def default():
        return False

    def process(self, output):
        return output[-1].strip() == "yes"


class LegacyCudaKey(FactBase):
    """Whether apt still trusts NVIDIA's retired repo key 7fa2af80."""

    def command(self):
        # apt-key builds a scratch keyring under $TMPDIR: in RAM, so reading the fact leaves
        # the disk as it was (a --dry run writes nothing).
        return ("command -v apt-key >/dev/null && { [ -w /dev/shm ] && export TMPDIR=/dev/shm; "
                "apt-key list 2>/dev/null; } | tr -d ' ' "
                f"| grep -qi {LEGACY_KEY} && echo yes || echo no")

    @staticmethod
    def default():
        return False

    def process(self, output):
        return output[-1].strip() == "yes"


def gpu_plan(s: Settings, os_ident: str) -> dict:
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
    plan.update(gpus=gpus, smi_error=smi["error"], installed_driver=installed)
    return plan


@operation(is_idempotent=False)
def report_plan(plan: dict):
    """
    Show the resolved GPU stack in the run output; changes nothing.

    + plan: the resolver's result for this host
    """
    if not plan["gpu"]:
        host.noop("no NVIDIA GPU found: CPU-only host, GPU stack skipped, torch build 'cpu'")
    else:
        host.noop(f"GPU {plan['gpus'][0]['name']}: CUDA {plan['cuda']}, driver branch "
                  f"{plan['driver_branch']}{' (kept)' if plan['keep_driver'] else ''}, "
                  f"{plan['cudnn']}, torch {plan['torch_tag']}")
    return
    yield


@operation(is_idempotent=False)
def secure_boot(plan: dict, module_signed: bool):
    """
    Stop before installing a driver whose unsigned module Secure Boot would refuse.

    + plan: the resolver's result for this host
    + module_signed: the inventory says a MOK is enrolled and DKMS signs the module
    """
    if plan["keep_driver"] or module_signed:
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


def _packages_needed(plan: dict, s: Settings) -> list[str]:
    installed = host.get_fact(DebPackages)
    toolkits = host.get_fact(CudaToolkits)["installed"]
    needed = []
    if not plan["keep_driver"]:
        needed.append(f"cuda-drivers-{plan['driver_branch']}")
    if plan["cuda"] not in toolkits:
        needed.append(f"cuda-toolkit-{plan['cuda'].replace('.', '-')}")
    cudnn = plan["cudnn"]
    name, _, version = cudnn.partition("=")
    if cudnn != "none" and (name not in installed or (version and version not in installed[name])):
        needed.append(cudnn)
    return needed


@operation()
def cuda_repo(plan: dict, s: Settings):
    """
    Set up NVIDIA's CUDA apt repo through cuda-keyring, when a package must come from it.

    + plan: the resolver's result (repo_distro)
    + s: the host's settings (cuda_repo_url: NVIDIA's URL or a mirror of it)
    """
    if not _packages_needed(plan, s):
        host.noop("driver, toolkit and cuDNN are in place: the CUDA repo is not needed")
        return
    base = f"{s.cuda_repo_url.rstrip('/')}/{plan['repo_distro']}/x86_64"
    # Read before anything runs: pyinfra executes each yielded command before resuming here.
    keyring_missing = "cuda-keyring" not in host.get_fact(DebPackages)
    lists_missing = not host.get_fact(AptKnowsRepo, url=base)
    if host.get_fact(LegacyCudaKey):
        yield f"apt-key del {LEGACY_KEY}"
    if keyring_missing:
        yield StringCommand("curl", "-fsSL", "-o", "/tmp/cuda-keyring.deb",
                            QuoteString(f"{base}/cuda-keyring_1.1-1_all.deb"))
        yield "dpkg -i /tmp/cuda-keyring.deb && rm -f /tmp/cuda-keyring.deb"
    # Written by us as well, so a mirror URL wins over the one inside the keyring .deb.
    line = (f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {base}/ /\n")
    from io import StringIO

    put = files.put._inner(src=StringIO(line), mode="644",
                           dest=f"/etc/apt/sources.list.d/cuda-{plan['repo_distro']}-x86_64.list")
    changed = False
    for command in put:
        changed = True
        yield command
    if changed or keyring_missing or lists_missing:
        yield "apt-get update -qq"


@operation()
def nouveau(allow_reboot: bool):
    """
    Blacklist nouveau so the NVIDIA module can bind, and rebuild the initramfs.

    + allow_reboot: whether a reboot may follow (only noted here: the driver step reboots)
    """
    from io import StringIO

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
def packages(plan: dict, s: Settings):
    """
    Install the resolved driver branch, CUDA toolkit and cuDNN; never downgrade or
    replace a driver that already satisfies the toolkit (gpu.hold pins them after).

    + plan: the resolver's result for this host
    + s: the host's settings (kernel_headers)
    """
    needed = _packages_needed(plan, s)
    if needed and not plan["keep_driver"] and s.kernel_headers:
        # DKMS builds the module against the running kernel's headers.
        yield ("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
               "\"linux-headers-$(uname -r)\" "
               "|| { echo 'no linux-headers package for the running kernel '$(uname -r)'; install "
               "them or set kernel_headers=False if the module is built another way' >&2; exit 1; }")
    if needed:
        yield from apt.packages._inner(packages=needed, no_recommends=True)
    if not needed:
        host.noop(f"driver {plan['installed_driver'] or plan['driver_branch']}, CUDA {plan['cuda']} "
                  f"and {plan['cudnn']} are installed")


@operation()
def hold(plan: dict):
    """
    Hold the planned driver, toolkit and cuDNN packages so upgrades cannot move them.

    + plan: the resolver's result for this host
    """
    # NVIDIA's Debian repos name the driver package without its branch.
    holds = [f"nvidia-driver-{plan['driver_branch']}", "nvidia-driver",
             f"cuda-drivers-{plan['driver_branch']}"] if not plan["keep_driver"] else []
    holds.append(f"cuda-toolkit-{plan['cuda'].replace('.', '-')}")
    if plan["cudnn"] != "none":
        holds.append(plan["cudnn"].split("=")[0])
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
def cuda_link(plan: dict):
    """
    Point /usr/local/cuda at the planned toolkit.

    + plan: the resolver's result (cuda)
    """
    toolkits = host.get_fact(CudaToolkits)
    target = toolkits["installed"].get(plan["cuda"], f"/usr/local/cuda-{plan['cuda']}")
    if toolkits["current"] == target:
        host.noop(f"/usr/local/cuda -> {target}")
        return
    yield (f"update-alternatives --set cuda {target} 2>/dev/null || ln -sfn {target} /usr/local/cuda")


@operation(is_idempotent=False)
def module(plan: dict, allow_reboot: bool):
    """
    Check that the loaded kernel module matches the driver libraries; cure a mismatch by
    rebooting when allowed, else fail the host with the exact fix.

    + plan: the resolver's result for this host
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
