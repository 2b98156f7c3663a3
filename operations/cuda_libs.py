"""The four CUDA libraries cpm_kernels loads, made findable where it looks.

cpm_kernels 1.0.11 tries $CUDA_PATH/lib64/lib<name>.so, then
/usr/local/cuda/lib64/lib<name>.so, then ctypes.util.find_library(name). libcuda
belongs to the driver, not the toolkit, so /usr/local/cuda/lib64 lacks it and only
the ld.so cache saves the lookup, when it does. This stage links the driver's own
libcuda.so.1 (never a copy of another version) into /usr/local/cuda/lib64 and then
runs cpm_kernels' own lookup to prove all four resolve there.
"""

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from facts.cuda_libs import CUDA_LIB64, LIBS, CpmKernelsLookup, Lib64Links
from facts.gpu import DriverLibraries, KernelModule

from .common import fail
from .resolver import version_tuple

@operation()
def expose():
    """
    Link the driver's libcuda.so.1 (the loaded module's version) and the toolkit's
    unversioned libraries into /usr/local/cuda/lib64, where cpm_kernels looks first.
    """
    libs = host.get_fact(DriverLibraries)
    loaded = host.get_fact(KernelModule)
    if not libs:
        if host.state.is_executing:
            yield fail("no driver libcuda.so.1 found (ld.so cache and "
                                 "/usr/lib/x86_64-linux-gnu, /usr/local/nvidia/lib64, ...)")
            return
        host.noop("libcuda is linked once the driver is installed")
        return
    # The library of the loaded module's version, never one of another version.
    match = [lib for lib in libs if lib["version"] == loaded] or \
        sorted(libs, key=lambda lib: version_tuple(lib["version"]))[-1:]
    driver_lib = match[0]["path"]
    links = host.get_fact(Lib64Links)
    changed = False
    if links.get("cuda", {}).get("target") != driver_lib:
        yield from files.link._inner(path=f"{CUDA_LIB64}/libcuda.so", target=driver_lib,
                                     create_remote_dir=True)
        changed = True
    for name in LIBS[1:]:
        info = links.get(name, {})
        if not info.get("target") and info.get("versioned"):
            yield from files.link._inner(path=f"{CUDA_LIB64}/lib{name}.so", target=info["versioned"])
            changed = True
    if not changed:
        host.noop(f"{CUDA_LIB64}/libcuda.so -> {driver_lib}; toolkit libraries in place")


@operation(is_idempotent=False)
def check(python: str):
    """
    Run cpm_kernels' own library lookup; fail the host unless all four resolve to
    /usr/local/cuda/lib64.

    + python: the interpreter whose cpm_kernels is checked (the venv's)
    """
    if not host.state.is_executing:
        host.noop("checked at execution, after the libraries are linked")
        return
    found = host.get_fact(CpmKernelsLookup, python=python)
    if "error" in found:
        yield fail(f"cpm_kernels' lookup could not run with {python}: {found['error']}")
        return
    wrong = {n: p for n, p in found.items() if not (p or "").startswith(CUDA_LIB64 + "/")}
    if wrong:
        yield fail(
            "cpm_kernels would not find these libraries at /usr/local/cuda/lib64: "
            + ", ".join(f"{n} -> {p}" for n, p in wrong.items())
            + ". 'Library cuda is not initialized' follows at the first int4/int8 chat")
        return
    host.noop("cpm_kernels finds " + ", ".join(f"{n}={p}" for n, p in found.items()))
    return
    yield
