"""The GPU-kernel stage's pieces that run without a GPU: the plan's coverage check, the
quantization.py patch on the fixture's real file, and the fixture blob's shape."""

import ast
import base64
import bz2
from pathlib import Path

from operations import gpu_kernels
from operations.resolver import GpuPlan

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_QUANT = ROOT / "lab" / "fixtures" / "chatglm" / "quantization.py"


def plan(*caps):
    return GpuPlan(gpu=True, gpus=[{"name": "x", "compute_cap": c, "memory_mib": 0} for c in caps])


def test_only_uncovered_architectures_need_own_kernels():
    assert gpu_kernels.needs_own_kernels(GpuPlan()) == []
    assert gpu_kernels.needs_own_kernels(plan("8.6", "8.0")) == []
    assert gpu_kernels.needs_own_kernels(plan("9.0")) == ["9.0"]
    assert gpu_kernels.needs_own_kernels(plan("10.0", "9.0", "8.0")) == ["10.0", "9.0"]
    assert gpu_kernels.fatbin_path("/m", ["9.0"]) == "/m/quantization_kernels_sm90.fatbin"


def test_patch_repoints_the_blob_and_is_idempotent():
    text = FIXTURE_QUANT.read_text()
    new = gpu_kernels.patched(text, "/opt/m/quantization_kernels_sm90.fatbin")
    ast.parse(new)
    lines = new.split("\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(gpu_kernels.BLOB_LINE))
    assert "/opt/m/quantization_kernels_sm90.fatbin" in lines[i + 1] and gpu_kernels.MARK in lines[i + 1]
    assert gpu_kernels.patched(new, "/opt/m/quantization_kernels_sm90.fatbin") == new
    assert gpu_kernels.patched("import torch\n", "/x") is None


def test_patched_module_decodes_the_host_built_fatbin(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"\x50\xed\x55\xba fake fatbin")
    line = gpu_kernels.patched('quantization_code = "abc"\n', str(fatbin)).split("\n")[1]
    scope = {}
    exec(line, scope)
    assert bz2.decompress(base64.b64decode(scope["quantization_code"])) == fatbin.read_bytes()


def test_fixture_blob_is_like_upstreams_sm80_only_without_ptx():
    source = FIXTURE_QUANT.read_text()
    blob = next(line for line in source.splitlines() if line.startswith(gpu_kernels.BLOB_LINE))
    fatbin = bz2.decompress(base64.b64decode(blob[len(gpu_kernels.BLOB_LINE):-1]))
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    assert b"sm_80" in fatbin and b"sm_90" not in fatbin
    assert b".target" not in fatbin and b".version" not in fatbin  # no PTX text
