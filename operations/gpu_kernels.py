"""int4/int8 GPU kernels for GPUs that upstream's embedded kernel blob does not cover.

quantization.py embeds a CUDA fatbin with machine code for sm_61..sm_86 and no PTX, so
on an H100 (sm_90) or newer the first quantized forward fails with "no kernel image is
available for execution on the device". This stage compiles our own kernels (same five
names, arguments and launch shape; data/kernels/quantization_kernels.cu) with the host's
nvcc for its architecture, and points quantization.py's blob at them.
"""

import hashlib
from io import StringIO

from pyinfra import host
from pyinfra.api import StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.operations import files

from facts.kernel import KernelState

from .common import fail, text_of
from .kernel import install_built
from .resolver import GpuPlan
from .settings import DATA, load_toml

SOURCE = DATA / "kernels" / "quantization_kernels.cu"
BLOB_LINE = 'quantization_code = "'
MARK = "# chatglm-deploy: GPU kernels built on this host"


def needs_own_kernels(plan: GpuPlan) -> list[str]:
    """Compute capabilities of this host's GPUs that upstream's blob cannot run on."""
    if not plan.gpu:
        return []
    covered = load_toml("compat.toml")["upstream_kernels"]["sass"]
    return sorted({g["compute_cap"] for g in plan.gpus if g["compute_cap"] not in covered})


def fatbin_path(model_dir: str, caps: list[str]) -> str:
    return f"{model_dir}/quantization_kernels_{'_'.join('sm' + c.replace('.', '') for c in caps)}.fatbin"


@operation()
def build(model_dir: str, caps: list[str], nvcc: str = "/usr/local/cuda/bin/nvcc"):
    """
    Compile the five weight kernels for the host's GPU architectures, with PTX too.

    + model_dir: the int4/int8 model checkout
    + caps: compute capabilities to build for, e.g. ["9.0"]
    + nvcc: the toolkit's compiler
    """
    source = f"{model_dir}/quantization_kernels_cuda.cu"
    out = fatbin_path(model_dir, caps)
    yield from files.put._inner(src=str(SOURCE), dest=source, mode="644")
    want = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    state = host.get_fact(KernelState, source=source, built=out)
    if state["built"] == want:
        host.noop(f"{out} is up to date")
        return
    gencode = []
    for cap in caps:
        arch = cap.replace(".", "")
        # PTX as well as SASS: a newer GPU's driver can JIT it.
        gencode += ["-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]
    yield StringCommand(nvcc, "-fatbin", "-O3", *gencode, QuoteString(source), "-o",
                        QuoteString(out + ".tmp"))
    yield from install_built(source, out)


def patched(text: str, fatbin: str) -> str | None:
    """quantization.py re-pointing its kernel blob at fatbin; None if the blob is absent."""
    lines = [line for line in text.split("\n") if MARK not in line]
    for i, line in enumerate(lines):
        if line.startswith(BLOB_LINE):
            lines.insert(i + 1, (
                'quantization_code = __import__("base64").b64encode(__import__("bz2").compress('
                f'__import__("pathlib").Path({fatbin!r}).read_bytes())).decode()  {MARK}'))
            return "\n".join(lines)
    return None


@operation()
def patch(model_dir: str, caps: list[str]):
    """
    Make quantization.py load the host-built kernels instead of its embedded blob.

    + model_dir: the int4/int8 model checkout
    + caps: the compute capabilities the kernels were built for
    """
    path = f"{model_dir}/quantization.py"
    text = text_of(path)
    if text is None:
        host.noop(f"{path} is patched once the model is cloned")
        return
    new = patched(text, fatbin_path(model_dir, caps))
    if new is None:
        yield fail(f"{path}: no line starting with {BLOB_LINE!r}, so the GPU kernel blob cannot "
                   "be replaced; this quantization.py differs from the upstream versions")
        return
    if new == text:
        host.noop(f"{path} already loads the host-built GPU kernels")
        return
    yield from files.put._inner(src=StringIO(new), dest=path, mode="644")
