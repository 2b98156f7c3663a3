"""On a CUDA machine: do the host-built GPU kernels give the CPU reference kernel's results?

    python3 tools/gpu_kernel_check.py MODEL_DIR OUT.json

MODEL_DIR is an int4 or int8 checkout the deploy has patched (kernel built, quantization.py
re-pointed at the host-built fatbin). Random weights are packed on the GPU
(int4WeightCompression), extracted on the GPU (Half and Float kernels) and on the CPU by
the compiled C kernel; every value must be equal.
"""

import json
import sys

import torch
from transformers import AutoModel

model_dir, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
q = sys.modules[model.__module__.rsplit(".", 1)[0] + ".quantization"]
report = {"gpu": torch.cuda.get_device_name(0), "kernels": type(q.kernels).__name__}

for bits in (8, 4):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(384, 4096, generator=gen).half()
    packed_cpu, scale = q.quantize_weight(weight, bits) if hasattr(q, "quantize_weight") else (None, None)
    layer = q.QuantizedLinear(bits, weight.cuda(), None)  # packs on the GPU
    packed, scale = layer.weight, layer.weight_scale
    cpu = q.extract_weight_to_float(packed.cpu(), scale.float().cpu(), bits)
    gpu_half = q.extract_weight_to_half(packed, scale.half(), bits).float().cpu()
    gpu_float = q.extract_weight_to_half(packed, scale.float(), bits).float().cpu()
    report[f"int{bits}"] = {
        "shape": list(weight.shape),
        "gpu_half_equals_cpu_kernel": bool(torch.equal(gpu_half, cpu.half().float())),
        "gpu_float_equals_cpu_kernel": bool(torch.equal(gpu_float, cpu)),
        "max_abs_diff": float((gpu_float - cpu).abs().max()),
    }
    if packed_cpu is not None:
        report[f"int{bits}"]["gpu_packing_equals_cpu_packing"] = bool(torch.equal(packed.cpu(), packed_cpu))

json.dump(report, open(out, "w"), indent=1)
print(json.dumps(report, indent=1))
ok = all(v for k, r in report.items() if isinstance(r, dict) for n, v in r.items() if n.startswith("gpu_"))
sys.exit(0 if ok else 1)
