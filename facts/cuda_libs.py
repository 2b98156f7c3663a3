"""What the CUDA libs stage reads: the links in /usr/local/cuda/lib64 and cpm_kernels' own
library lookup.
"""

import json
import shlex

from pyinfra.api import FactBase


LIBS = ("cuda", "cudart", "cublasLt", "nvrtc")
CUDA_LIB64 = "/usr/local/cuda/lib64"


# Loads cpm_kernels/library/base.py on its own: importing the package would call
# cudaGetDeviceCount, which raises on hosts without a working driver.
LOOKUP = (
    "import importlib.util as u, json, os, sys; "
    "spec = u.find_spec('cpm_kernels'); "
    "base = os.path.join(spec.submodule_search_locations[0], 'library', 'base.py'); "
    "m = u.module_from_spec(u.spec_from_file_location('cpm_lookup', base)); "
    "spec2 = m.__spec__; spec2.loader.exec_module(m); "
    "print(json.dumps({n: m.unix_find_lib(n) for n in sys.argv[1:]}))"
)


class CpmKernelsLookup(FactBase):
    """What cpm_kernels' unix_find_lib returns for each library, or {"error": ...}."""

    def command(self, python):
        names = " ".join(LIBS)
        return (f"{shlex.quote(python)} -c \"{LOOKUP}\" {names} 2>&1 | tail -1 || true")

    @staticmethod
    def default():
        return {"error": "no output"}

    def process(self, output):
        try:
            return json.loads(output[-1])
        except ValueError:
            return {"error": output[-1]}


class Lib64Links(FactBase):
    """For each library: what /usr/local/cuda/lib64/lib<name>.so resolves to ('' when absent
    or dangling), and the newest versioned file beside it."""

    def command(self):
        return "; ".join(
            f"t=$([ -e {CUDA_LIB64}/lib{n}.so ] && readlink -f {CUDA_LIB64}/lib{n}.so); "
            f"v=$(ls {CUDA_LIB64}/lib{n}.so.* 2>/dev/null | sort -V | tail -1); "
            f"echo \"{n} ${{t:--}} ${{v:--}}\""
            for n in LIBS)

    @staticmethod
    def default():
        return {}

    def process(self, output):
        links = {}
        for line in output:
            name, target, versioned = line.split()
            links[name] = {"target": target.strip("-"), "versioned": versioned.strip("-")}
        return links
