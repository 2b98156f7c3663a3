"""What the GPU stage reads: NVIDIA GPUs on the PCI bus and as the driver sees them, the
loaded kernel module, the driver libraries, Secure Boot, installed CUDA toolkits, apt holds
and repositories.
"""

import re

from pyinfra.api import FactBase


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
