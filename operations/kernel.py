"""The CPU quantization kernel, built once per host, and quantization.py patched to load it.

Upstream's quantize() calls load_cpu_kernel(**kwargs) with no kernel_file, so every
model load compiles the kernel again ("No compiled kernel found."). The patch hands
it the prebuilt .so by absolute path: transformers imports quantization.py from its
modules cache, so a path relative to the file would point at the wrong place.
"""

import re
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import OperationError, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.operations import files

from facts.kernel import CALL, MARK, STAMP, KernelState, PatchLines
from facts.system import CpuCount

from .common import fail, text_of

CALL_RE = re.compile(r"^[ \t]*load_cpu_kernel\(\*\*kwargs\)[ \t]*(#.*)?$")
# The modeling code calls load_cpu_kernel(**kwargs) itself too (quantize() of a model already
# quantized, on the CPU), with no kernel_file: the function's own first line covers that call.
DEF = "def load_cpu_kernel(**kwargs):"
def _setdefault(indent: str, kernel: str) -> str:
    return f'{indent}kwargs.setdefault("kernel_file", {kernel!r})  {MARK}'


def is_patched(lines: list, kernel: str) -> bool:
    """Whether patched() would leave a file with these PatchLines unchanged: every call
    line has our exact line right above it, the function's definition right below it, and
    no mark line stands anywhere else. (PatchLines' grep for the call finds the definition
    line too: it contains the call's text.)"""
    text = dict(lines)
    defs = [n for n, line in lines if line.startswith(DEF)]
    calls = [n for n, line in lines if CALL_RE.match(line)]
    marks = {n for n, line in lines if MARK in line}
    if not calls or marks != {n - 1 for n in calls} | {n + 1 for n in defs}:
        return False
    for n in calls:
        indent = text[n][: len(text[n]) - len(text[n].lstrip())]
        if text[n - 1] != _setdefault(indent, kernel):
            return False
    return all(text[n + 1].strip() == _setdefault("", kernel) for n in defs)


def kernel_source(model_dir: str, cpus: int = 0) -> str:
    """quantization_kernels_parallel.c on hosts with 4+ cores, else the serial one.
    cpus: the host's CPU count when already known (else read with CpuCount)."""
    parallel = (cpus or host.get_fact(CpuCount)) >= 4
    return f"{model_dir}/quantization_kernels{'_parallel' if parallel else ''}.c"


@operation()
def build(model_dir: str, cpus: int = 0):
    """
    Compile the CPU quantization kernel into the model directory, once per source change.

    + model_dir: the int4/int8 model checkout holding quantization_kernels*.c
    + cpus: the host's CPU count when deploy.py read it already (0: read it here)
    """
    source = kernel_source(model_dir, cpus)
    built = source[:-2] + ".so"
    state = host.get_fact(KernelState, source=source, built=built)
    if not state["source"]:
        if host.state.is_executing:
            yield fail(f"{source} is missing: the model checkout holds no CPU kernel")
            return
        host.noop(f"{source} is built once the model is cloned")
        return
    if state["source"] == state["built"]:
        host.noop(f"{built} is up to date")
        return
    # The flags of upstream's own compile, so the .so matches what quantize() would build.
    yield StringCommand("gcc", "-O3", "-fPIC", "-pthread", "-fopenmp", "-std=c99",
                        QuoteString(source), "-shared", "-o", QuoteString(built + ".tmp"))
    yield from install_built(source, built)


def install_built(source: str, built: str):
    """Move a kernel built to <built>.tmp into place and stamp it with its source's sha256
    (what KernelState compares)."""
    yield StringCommand("mv", "-f", QuoteString(built + ".tmp"), QuoteString(built))
    yield StringCommand("sh", "-c", QuoteString(
        f"sha256sum {shlex.quote(source)} | cut -d' ' -f1 > "
        f"{shlex.quote(built + '.' + STAMP.lstrip('.'))}"))


def patched(text: str, path: str, kernel: str) -> str:
    """quantization.py with quantize() given the prebuilt kernel; raises if the call is absent.

    Both upstream shapes of quantize() are handled: the final one calls
    `load_cpu_kernel(**kwargs)` directly, the April 2023 one inside `try:`; the line set
    before the call takes the call's own indentation, so it lands in the same block. The
    same line opens load_cpu_kernel() itself, for the modeling code's own call of it.
    """
    lines = text.split("\n")
    out, found, body = [], False, None
    for line in lines:
        if MARK in line:
            continue
        if body is not None and line.strip():
            out.append(_setdefault(line[: len(line) - len(line.lstrip())] or "    ", kernel))
            body = None
        if CALL_RE.match(line):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(_setdefault(indent, kernel))
            found = True
        out.append(line)
        if line.startswith(DEF):
            body = True  # the mark goes above the function's first statement
    if not found:
        raise OperationError(f"{path}: the line {CALL!r} (in quantize()) was not found, so the "
                             "prebuilt kernel cannot be passed in; this quantization.py differs "
                             "from the upstream versions the patch knows (May 2023, and April "
                             "2023 with the call inside try:); pin a model revision whose "
                             "quantization.py has that line")
    return "\n".join(out)


@operation()
def patch_quantization(model_dir: str, cpus: int = 0):
    """
    Make quantize() load the prebuilt kernel by absolute path instead of compiling it.

    + model_dir: the int4/int8 model checkout
    + cpus: the host's CPU count when deploy.py read it already (0: read it here)
    """
    path = f"{model_dir}/quantization.py"
    kernel = kernel_source(model_dir, cpus)[:-2] + ".so"
    lines = host.get_fact(PatchLines, path=path)
    if lines and is_patched(lines, kernel):
        host.noop(f"{path} already loads {kernel}")
        return
    text = text_of(path) if lines is not None else None
    if text is None:
        if host.state.is_executing:
            yield fail(f"{path} is missing from the model checkout")
            return
        host.noop(f"{path} is patched once the model is cloned")
        return
    try:
        new = patched(text, path, kernel)
    except OperationError as error:
        yield fail(str(error))
        return
    if new == text:
        host.noop(f"{path} already loads {kernel}")
        return
    yield from files.put._inner(src=StringIO(new), dest=path, mode="644")
