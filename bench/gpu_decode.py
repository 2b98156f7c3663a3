"""Decode speed on a GPU: the reference path (upstream-style modeling code) against runtime.engine.

    python bench/gpu_decode.py --out DIR [--variants fp16,int8,int4] [--sweep]

Runs on a CUDA machine (the device tool's H200). Full-size random weights with ChatGLM-6B's shapes
(28 layers, hidden 4096, FFN 16384, 32 heads, vocab 130528) are made on the GPU, nothing is
downloaded. The reference path is the fixture's modeling code (lab/fixtures/chatglm), which
follows upstream's arithmetic and its way of running (a growing KV cache concatenated each step,
int4/int8 weights expanded to fp16 by the cpm_kernels launch of data/kernels/quantization_kernels.cu
on every forward) and stands in for upstream's code. For each variant, in one run, both paths:
set-up time, VRAM, time to first token for a 512-token prompt, decode tokens/s at batch 1 (256 new
tokens) and total tokens/s with 16 sequences decoding together, each set against the bandwidth
bound (memory bandwidth over the bytes of weights read per decode step); and correctness: greedy
tokens of the engine against the reference's, and the reference's top-1 token with both fed the
same tokens (teacher forcing).

--sweep first times runtime.kernels' int4/int8 kernels over a few launch settings per shape.
Results: DIR/gpu_decode.json and DIR/gpu_decode.md (bench/results/ keeps the copies).
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lab.fixtures import build  # noqa: E402
from lab.fixtures.chatglm import quantization as fixture_quantization  # noqa: E402
from lab.fixtures.chatglm.configuration_chatglm import ChatGLMConfig  # noqa: E402
from lab.fixtures.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration  # noqa: E402

FULL = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384,
            bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3)
DATASHEET_BANDWIDTH = 4.8e12  # H200 SXM, bytes/s
TINY = dict(FULL, vocab_size=1024, hidden_size=256, num_layers=2, num_attention_heads=4, inner_hidden_size=1024,
            bos_token_id=6, eos_token_id=7, mask_token_id=4, gmask_token_id=5)
DEVICE = "cuda"  # --tiny: "cpu", to check the script itself on a machine without a GPU


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def sync_time():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory(reset=False):
    if DEVICE != "cuda":
        return 0
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def measured_copy_bandwidth():
    """Device-to-device copy of 4 GiB, bytes read plus written per second (median of 10)."""
    src = torch.empty(2 ** 31, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    times = sorted(times[2:])
    return 2 * 2 ** 31 / times[len(times) // 2]


# --- reference int4/int8 kernels: built the way the deploy's GPU-kernel stage builds them -------------

def install_reference_kernels(workdir: Path):
    """Compile data/kernels/quantization_kernels.cu for this GPU with nvcc and hand it to the
    fixture's quantization module (cpm_kernels launches it). Returns how, or why not."""
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    fatbin = workdir / f"quantization_kernels_sm{arch}.fatbin"
    nvcc = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
    try:
        subprocess.run([nvcc, "-fatbin", "-O3", "-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]",
                        str(ROOT / "data/kernels/quantization_kernels.cu"), "-o", str(fatbin)], check=True)
        fixture_quantization.kernels = fixture_quantization.Kernel(fatbin.read_bytes(), fixture_quantization._CUDA_FUNCTIONS)
        return f"cpm_kernels + nvcc fatbin sm_{arch}"
    except Exception as error:  # no nvcc or no cpm_kernels: expand with torch instead (slower than upstream)
        from runtime.engine import dequantize

        def extract(weight, scale_list, source_bit_width, quantization_cache=None):
            return dequantize(weight, scale_list, source_bit_width, torch.float16)

        fixture_quantization.extract_weight_to_half = extract
        return f"torch dequantize (reference kernels unavailable: {error})"


# --- models ------------------------------------------------------------------------------------------

def random_model(seed=0):
    torch.manual_seed(seed)
    config = ChatGLMConfig(**FULL)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(DEVICE):
            model = ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layernorm" in name:
                if name.endswith("weight"):
                    tensor.fill_(1.0)
                else:
                    tensor.normal_(0.0, 0.02)
            else:
                tensor.normal_(0.0, 0.02)  # biases too: upstream's are not zero
    return model.half().eval()


LINEARS = (("attention", "query_key_value"), ("attention", "dense"), ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h"))


def originals(model):
    """The fp16 linear modules of every GLM block, kept to make each variant from the same weights."""
    return [{(owner, name): getattr(getattr(layer, owner), name) for owner, name in LINEARS}
            for layer in model.transformer.layers]


def set_variant(model, masters, bits):
    """Put fp16 linears (bits 0) or upstream's int4/int8 layers (packed bytes, fp16 per-row scales,
    quantized on the GPU by the fixture's pure-torch reference quantizer) into every block."""
    for layer, linears in zip(model.transformer.layers, masters):
        for (owner, name), linear in linears.items():
            if bits:
                module = fixture_quantization.QuantizedLinear(bits, linear.weight, linear.bias, empty_init=True)
                packed, scale = build.quantize_rows(linear.weight.data, bits)
                module.weight.data, module.weight_scale.data = packed, scale
            else:
                module = linear
            setattr(getattr(layer, owner), name, module)
    sync_time()
    return model


def weight_bytes_per_token(model):
    """Bytes a decode step must read: every parameter except the embedding table (one row)."""
    total = 0
    for name, tensor in model.named_parameters():
        if "word_embeddings" in name:
            total += tensor.shape[-1] * tensor.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def prompt_ids(length, seed):
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(10, min(130000, FULL["vocab_size"]), (length - 2,), generator=generator).tolist()
    return body + [FULL["gmask_token_id"], FULL["bos_token_id"]]


# --- the reference path --------------------------------------------------------------------------------

@torch.no_grad()
def reference_run(model, ids_batch, new_tokens):
    """Greedy decoding with the modeling code's own forward and growing cache, as upstream's
    chat() runs it. Returns (first-token seconds, decode seconds, tokens per row)."""
    sequence = torch.tensor(ids_batch, device=DEVICE)
    start = sync_time()
    output = model(input_ids=sequence, use_cache=True)
    token = output.logits[:, -1].float().argmax(dim=-1, keepdim=True)
    first = sync_time() - start
    past, tokens = output.past_key_values, [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        sequence = torch.cat((sequence, token), dim=1)
        output = model(input_ids=token, past_key_values=past, position_ids=model.next_position_ids(sequence),
                       use_cache=True)
        past = output.past_key_values
        token = output.logits[:, -1].float().argmax(dim=-1, keepdim=True)
        tokens.append(token)
    decode = sync_time() - start
    return first, decode, torch.cat(tokens, dim=1).tolist()


# --- the engine ----------------------------------------------------------------------------------------

def measure_engine(model, single, batch_prompts, args, triton_cache, ref_tokens, ref_batch_tokens):
    from runtime.engine import Engine

    peak_memory(reset=True)
    files_before = cache_files(triton_cache)
    start = sync_time()
    engine = Engine(model, None, device=DEVICE, max_batch=args.batch, max_len=args.prompt + args.new + 8)
    engine.warmup()
    setup = sync_time() - start
    fast = dict(setup_s=setup, use_kernels=engine.use_kernels, use_graphs=engine.use_graphs,
                new_triton_cache_files_at_setup=cache_files(triton_cache) - files_before)
    engine_single(engine, single, 8)  # first prefill of this shape: cuBLAS set-up off the clock
    ttft, decode, tokens, _ = engine_single(engine, single, args.new)
    fast.update(ttft_s=ttft, decode_tokens_per_s=(args.new - 1) / decode)
    if engine.use_graphs:
        # The GPU's own time per step: the batch-1 graph replayed back to back (no Python between),
        # against the step() loop above: the difference is the host's share.
        graph = engine._graph(1)[0]
        graph.replay()
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        for _ in range(50):
            graph.replay()
        end_event.record()
        end_event.synchronize()
        fast["graph_step_ms"] = start_event.elapsed_time(end_event) / 50
        fast["step_loop_ms"] = decode / (args.new - 1) * 1e3
        try:
            fast["step_kernels"] = step_kernels(graph)
        except Exception as error:  # the profiler is a diagnosis: the figures above stand without it
            fast["step_kernels"] = f"{type(error).__name__}: {error}"
    prefill, decode_b, produced = engine_batch(engine, batch_prompts, args.batch_new)
    fast["batch_tokens_per_s"] = (produced - args.batch) / decode_b
    fast["batch_prefill_s"] = prefill
    fast["peak_vram_gb"] = peak_memory() / 1e9
    fast["kv_cache_gb"] = 2 * engine.k_cache.numel() * engine.k_cache.element_size() / 1e9
    fast["new_triton_cache_files_total"] = cache_files(triton_cache) - files_before
    log("engine", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in fast.items()})
    # Correctness: top-1 with the reference's tokens fed (the caller compares the free run too),
    # for the single prompt and for all 16 prompts of the batched run together.
    forced = engine_forced(engine, single, ref_tokens)
    batch_forced, batch_gaps = engine_forced_batch(engine, batch_prompts, ref_batch_tokens)
    agree = sum(a == b for mine, ref in zip(batch_forced, ref_batch_tokens) for a, b in zip(mine, ref))
    steps = sum(len(ref) for ref in ref_batch_tokens)
    return fast, tokens, forced, dict(batch_top1_agreement=agree / steps, batch_steps=steps,
                                      batch_mismatch_logit_gaps=batch_gaps[:20])


def step_kernels(graph, replays=20):
    """Where a batch-1 graph step's GPU time goes: kernel time per family (ms per step), the
    number of kernels, and the rest of the step (gaps between kernels: launch and tail)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    families = {}
    count = 0
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if not us or event.count == 0:
            continue
        name = event.key
        family = ("int GEMV" if "qlinear" in name else "attention" if "attention" in name or "combine" in name
                  else "layer norm" if "layer_norm" in name.lower() or "LayerNorm" in name
                  else "fp16 GEMM/GEMV" if "gemv" in name.lower() or "gemm" in name.lower() or "sm90" in name
                  else "other")
        families.setdefault(family, [0.0, 0])
        families[family][0] += us / 1e3 / replays
        families[family][1] += event.count / replays
        count += event.count / replays
    return {"kernels_per_step": round(count, 1),
            "ms_per_step": {k: round(v[0], 3) for k, v in sorted(families.items())},
            "kernels": {k: round(v[1], 1) for k, v in sorted(families.items())},
            "kernel_ms_total": round(sum(v[0] for v in families.values()), 3)}


def engine_single(engine, ids, new_tokens):
    start = sync_time()
    slot = engine.add(ids, max_new_tokens=new_tokens, stop_ids=[])
    tokens = [t for _, t, _ in engine.step()]  # the prompt's run and its first token
    first = sync_time() - start
    start = time.perf_counter()
    while engine.active:
        tokens += [t for _, t, _ in engine.step()]
    decode = sync_time() - start
    return first, decode, tokens, slot


def engine_forced(engine, ids, reference):
    """The engine's top-1 at each step, fed the reference's tokens; and, where it differs from the
    reference's, by how much the engine's own logits rank the two apart (a near tie or not)."""
    tokens, gaps = engine_forced_batch(engine, [ids], [reference])
    return tokens[0], gaps


def engine_forced_batch(engine, prompts, references):
    slots = [engine.add(ids, max_new_tokens=len(ref), stop_ids=[]) for ids, ref in zip(prompts, references)]
    mine = {slot: [] for slot in slots}
    gaps = []
    for slot, token, _ in engine.step():
        mine[slot].append(token)
    for step in range(len(references[0]) - 1):
        force = {slot: ref[step] for slot, ref in zip(slots, references)}
        for row, (slot, token, _) in enumerate(engine.step(force=force)):
            mine[slot].append(token)
            expected = references[slots.index(slot)][step + 1]
            if token != expected and engine.last_logits is not None:
                logits = engine.last_logits[row].float()
                gaps.append(round(float(logits[token] - logits[expected]), 4))
    for slot in slots:
        engine.cancel(slot)
    return [mine[slot] for slot in slots], gaps


def engine_batch(engine, prompts, new_tokens):
    start = sync_time()
    for ids in prompts:
        engine.add(ids, max_new_tokens=new_tokens, stop_ids=[])
    produced = len(engine.step())  # the prompts' run and their first tokens
    prefill = sync_time() - start
    start = time.perf_counter()
    while engine.active:
        produced += len(engine.step())
    decode = sync_time() - start
    return prefill, decode, produced


def gpu_time(fn):
    """Milliseconds of GPU time per call: fn captured in a CUDA graph and replayed, so that the
    host's launch cost (larger than these kernels at batch 1) stays out, as in the engine."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median")


class Rotation:
    """Several copies of the same-shaped inputs, used in turn by successive calls, so that one
    call's data has left the 60 MB L2 before it is read again (timings of HBM, not of L2)."""

    def __init__(self, make, nbytes, total=512 * 2 ** 20):
        self.items = [make() for _ in range(max(2, -(-total // nbytes)))]
        self.next = 0

    def __call__(self):
        item = self.items[self.next % len(self.items)]
        self.next += 1
        return item


def sweep():
    """GPU time and GB/s of runtime.kernels per shape and launch setting (rows 1 = one sequence,
    16 = a batch), with cuBLAS fp16 as the yardstick, and of both decode attention kernels."""
    from runtime import kernels

    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "h_to_4h": (16384, 4096), "4h_to_h": (4096, 16384)}
    # (BLOCK_N, BLOCK_K, warps, stages, magic, join, dot): see runtime.kernels._tiles.
    single = [(16, 1024, 4, 3, True), (8, 512, 4, 3, True), (16, 512, 4, 3, True, True, False),
              (32, 256, 4, 3, True, True, True), (64, 256, 4, 3, True, True, True)]
    # 32-bit words, (BLOCK_N, BLOCK_K, warps, stages): few rows per program, so that the 4096-row
    # shapes still give every SM several programs.
    single += [(n, k, w, st, True, False, False, True)
               for n, k, w, st in ((8, 512, 4, 3), (4, 1024, 4, 3), (4, 512, 4, 4), (2, 1024, 4, 3),
                                   (8, 1024, 8, 3), (16, 512, 4, 4), (2, 2048, 8, 3), (1, 2048, 4, 3))]
    batched = [(64, 128, 4, 3, False), (32, 256, 4, 3, True, True, True), (64, 256, 4, 3, True, True, True),
               (64, 128, 4, 4, True, True, True)]
    rows = []

    def record(row, ms, nbytes):
        row.update(us=round(ms * 1e3, 1), GBps=round(nbytes / (ms / 1e3) / 1e9))
        rows.append(row)
        log("sweep", {k: v for k, v in row.items()})

    for bits in (4, 8):
        for label, (n, k) in shapes.items():
            nbytes = n * k * bits // 8
            weights = Rotation(lambda: (torch.randint(-128, 127, (n, k * bits // 8), dtype=torch.int8, device=DEVICE),
                                        torch.rand(n, dtype=torch.float16, device=DEVICE) / 100), nbytes)
            for m in (1, 16):
                x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
                for config in (single if m == 1 else batched):
                    def call():
                        weight, scale = weights()
                        kernels.qlinear(x, weight, scale, bits, config=config)
                    try:
                        record(dict(bits=bits, shape=label, rows=m, config=config), gpu_time(call), nbytes)
                    except Exception as error:
                        rows.append(dict(bits=bits, shape=label, rows=m, config=config, error=str(error)[:300]))
                        log("sweep failed", bits, label, m, config, str(error)[:300])
            del weights
            if bits == 4:  # fp16 cuBLAS for the same shape
                dense = Rotation(lambda: torch.randn(n, k, dtype=torch.float16, device=DEVICE), n * k * 2)
                for m in (1, 16):
                    x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
                    record(dict(bits=16, shape=label, rows=m, config="cuBLAS"),
                           gpu_time(lambda: torch.nn.functional.linear(x, dense())), n * k * 2)
                del dense
    # The fused decode attention: one new token per sequence over 768 cached ones.
    heads, hd, length = 32, 128, 768
    for batch in (1, 16):
        nbytes = 2 * batch * heads * length * hd * 2
        caches = Rotation(lambda: (torch.randn(batch + 1, heads, 1024, hd, dtype=torch.float16, device=DEVICE),
                                   torch.randn(batch + 1, heads, 1024, hd, dtype=torch.float16, device=DEVICE)),
                          2 * (batch + 1) * heads * 1024 * hd * 2)
        table = torch.randn(1025, hd // 2, dtype=torch.float16, device=DEVICE)
        qkv = torch.randn(batch, 3 * heads * hd, dtype=torch.float16, device=DEVICE)
        index = torch.arange(batch, dtype=torch.int32, device=DEVICE)
        lengths = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
        candidates = [("attention", c) for c in ((64, 4, 3), (128, 4, 3), (32, 4, 4))]
        if batch == 1:
            candidates += [("split attention", c) for c in ((64, 4, 3, 8), (32, 4, 3, 16), (32, 4, 3, 32))]
        for kind, config in candidates:
            attend = kernels.split_attention if kind == "split attention" else kernels.decode_attention

            def call():
                # Same length every call: the key written at `length` is rewritten, nothing grows.
                k_cache, v_cache = caches()
                attend(qkv, k_cache, v_cache, table, table, index, lengths, index, index, heads, config=config)
            record(dict(kernel=kind, rows=batch, config=config), gpu_time(call), nbytes)
        del caches
    return rows


def kernels_settings_env():
    from runtime import kernels

    return kernels.SETTINGS_ENV


def tuned(rows):
    """The fastest launch settings of the sweep (summed over the four shapes), applied to
    runtime.kernels here and handed to the warm-up process through its environment variable."""
    from runtime import kernels

    def best(select):
        totals = {}
        for row in rows:
            if "us" in row and select(row):
                key = tuple(row["config"])
                totals.setdefault(key, []).append(row["us"])
        complete = {k: sum(v) for k, v in totals.items() if len(v) == max(len(x) for x in totals.values())}
        return list(min(complete, key=complete.get)) if complete else None

    values = kernels.settings()
    for bits in (4, 8):
        for key, rows_wanted in (("gemv", 1), ("small_batch", 16)):
            choice = best(lambda r: r.get("bits") == bits and r.get("rows") == rows_wanted and "kernel" not in r)
            if choice:
                values[key][str(bits)] = choice
    choice = best(lambda r: r.get("kernel") == "attention" and r["rows"] == 16)
    if choice:
        values["attention"] = choice
    choice = best(lambda r: r.get("kernel") == "split attention" and r["rows"] == 1)
    if choice:
        values["split"] = choice
        # Split only where it wins: compare the best of each kernel for one sequence.
        fastest = {kind: min((r["us"] for r in rows if r.get("kernel") == kind and r["rows"] == 1 and "us" in r),
                             default=float("inf")) for kind in ("attention", "split attention")}
        values["split_below"] = kernels.SPLIT_BELOW if fastest["split attention"] < fastest["attention"] else 0
    kernels.apply_settings(values)
    return values


def cache_files(path):
    return sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="fp16,int8,int4")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-new", type=int, default=128, help="new tokens per sequence in the batched runs")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks this script, measures nothing")
    args = parser.parse_args()
    global DEVICE
    if args.tiny:
        DEVICE = "cpu"
        FULL.update(TINY)
        from runtime.engine import dequantize

        # The C kernel of the int repos is not compiled here; the torch dequantizer is the same function.
        fixture_quantization.extract_weight_to_float = (
            lambda weight, scale, bits, quantization_cache=None: dequantize(weight, scale, bits, torch.float32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = DEVICE == "cuda"
    result = dict(gpu=torch.cuda.get_device_name(0) if gpu else "cpu",
                  capability=".".join(map(str, torch.cuda.get_device_capability())) if gpu else "0.0",
                  torch=torch.__version__, cuda=torch.version.cuda, prompt=args.prompt, new_tokens=args.new,
                  batch=args.batch, batch_new_tokens=args.batch_new, variants={})
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    log("GPU", result["gpu"], "torch", torch.__version__, "triton", result["triton"])

    # Deploy-time warm-up of Triton's cache in another process, then check this process compiles nothing.
    triton_cache = os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))
    if gpu:
        bandwidth = measured_copy_bandwidth()
        log(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s")
        if args.sweep:
            result["sweep"] = sweep()
            result["tuned"] = tuned(result["sweep"])
            os.environ[kernels_settings_env()] = json.dumps(result["tuned"])
            log("tuned launch settings:", result["tuned"])
        start = time.perf_counter()
        warm = subprocess.run([sys.executable, "-m", "runtime.kernels", "--warm"], cwd=ROOT, capture_output=True, text=True)
        result["triton_warm"] = dict(seconds=round(time.perf_counter() - start, 2), rc=warm.returncode,
                                     stdout=warm.stdout.strip()[-2000:], stderr=warm.stderr.strip()[-2000:])
        log("deploy-time warm", result["triton_warm"])

    else:
        bandwidth = DATASHEET_BANDWIDTH
    result["copy_bandwidth_Bps"] = bandwidth

    with tempfile.TemporaryDirectory() as tmp:
        result["reference_int_kernels"] = install_reference_kernels(Path(tmp)) if gpu else "CPU C kernel"
    log("reference int kernels:", result["reference_int_kernels"])

    from runtime.engine import Engine

    start = sync_time()
    base = random_model()
    masters = originals(base)
    build_seconds = sync_time() - start
    log(f"random fp16 model made in {build_seconds:.1f} s")
    single = prompt_ids(args.prompt, 1)
    batch_prompts = [prompt_ids(args.prompt, 100 + i) for i in range(args.batch)]

    for variant in args.variants.split(","):
        bits = {"fp16": 0, "int8": 8, "int4": 4}[variant]
        peak_memory(reset=True)
        start = sync_time()
        model = set_variant(base, masters, bits)
        quantize_seconds = sync_time() - start
        row = dict(bits=bits, weights_bytes_per_token=weight_bytes_per_token(model))
        row["bound_tokens_per_s"] = DATASHEET_BANDWIDTH / row["weights_bytes_per_token"]
        row["bound_tokens_per_s_measured_copy"] = bandwidth / row["weights_bytes_per_token"]
        log(variant, f"{row['weights_bytes_per_token'] / 1e9:.2f} GB per token, bound {row['bound_tokens_per_s']:.0f} tok/s"
            f" (made in {quantize_seconds:.1f} s)")

        # Reference path.
        peak_memory(reset=True)
        base_memory = torch.cuda.memory_allocated() if gpu else 0
        ttft, decode, ref_tokens = reference_run(model, [single], args.new)
        ref = dict(ttft_s=ttft, decode_tokens_per_s=(args.new - 1) / decode)
        ref_tokens = ref_tokens[0]
        _, decode_b, ref_batch_tokens = reference_run(model, batch_prompts, args.batch_new)
        ref["batch_tokens_per_s"] = args.batch * (args.batch_new - 1) / decode_b
        ref["peak_vram_gb"] = peak_memory() / 1e9
        ref["setup_s"] = 0.0
        log(variant, "reference", {k: round(v, 3) for k, v in ref.items()})

        try:
            fast, tokens, forced, batch_check = measure_engine(model, single, batch_prompts, args, triton_cache,
                                                               ref_tokens, ref_batch_tokens)
        except Exception:  # keep the reference's numbers and the other variants
            import traceback

            row["engine_error"] = traceback.format_exc()[-3000:]
            log(variant, "engine failed:", row["engine_error"])
            fast = None
        row["weights_gb"] = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
        row["base_allocated_gb"] = base_memory / 1e9
        row["reference"] = ref
        if fast is not None:
            same_prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(ref_tokens))
            row["correctness"] = dict(
                greedy_identical=tokens == ref_tokens, greedy_same_prefix=same_prefix, steps=len(ref_tokens),
                top1_agreement=sum(a == b for a, b in zip(forced[0], ref_tokens)) / len(ref_tokens),
                distinct_reference_tokens=len(set(ref_tokens)),
                mismatch_logit_gaps=forced[1], **batch_check)
            log(variant, "correctness", row["correctness"])
            fast["batch_over_single"] = fast["batch_tokens_per_s"] / fast["decode_tokens_per_s"]
            row["engine"] = fast
        for path in (ref, fast):
            if path is not None:
                path["decode_fraction_of_bound"] = path["decode_tokens_per_s"] / row["bound_tokens_per_s"]
                path["batch_fraction_of_bound"] = path["batch_tokens_per_s"] / (args.batch * row["bound_tokens_per_s"])
        result["variants"][variant] = row
        del model
        (out / "gpu_decode.json").write_text(json.dumps(result, indent=2) + "\n")

    (out / "gpu_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_decode.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result):
    lines = [f"# Decode on {result['gpu']} (sm_{result['capability'].replace('.', '')}), torch {result['torch']}, "
             f"triton {result['triton']}",
             "",
             f"Full-size random weights (28 layers, hidden 4096, FFN 16384, vocab 130528). Prompt {result['prompt']} tokens; "
             f"batch 1: {result['new_tokens']} new tokens; batch {result['batch']}: {result['batch_new_tokens']} new tokens "
             f"each. Bound = 4.8 TB/s (datasheet) / weight bytes read per step; the device-to-device copy measured "
             f"{result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s. Reference int kernels: {result['reference_int_kernels']}.",
             "",
             "| variant | path | set-up s | VRAM peak GB | TTFT 512 ms | batch-1 tok/s | of bound | "
             f"{result['batch']}-seq tok/s | of bound | x batch-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, row in result["variants"].items():
        for name in ("reference", "engine"):
            if name not in row:
                lines.append(f"| {variant} | {name} | failed: see gpu_decode.json |")
                continue
            p = row[name]
            lines.append(f"| {variant} | {name} | {p['setup_s']:.2f} | {p['peak_vram_gb']:.1f} | {p['ttft_s'] * 1e3:.0f} | "
                         f"{p['decode_tokens_per_s']:.1f} | {p['decode_fraction_of_bound']:.0%} | "
                         f"{p['batch_tokens_per_s']:.0f} | {p['batch_fraction_of_bound']:.0%} | "
                         f"{p['batch_tokens_per_s'] / p['decode_tokens_per_s']:.1f} |")
    lines += ["", "| variant | GB read per token | bound tok/s | greedy identical | same prefix | top-1 agreement (forced) "
              f"| top-1, {result['batch']} prompts batched (forced) | logit gaps where they differ |",
              "|---|---|---|---|---|---|---|---|"]
    for variant, row in result["variants"].items():
        if "correctness" not in row:
            continue
        c = row["correctness"]
        lines.append(f"| {variant} | {row['weights_bytes_per_token'] / 1e9:.2f} | {row['bound_tokens_per_s']:.0f} | "
                     f"{c['greedy_identical']} | {c['greedy_same_prefix']}/{c['steps']} | {c['top1_agreement']:.2%} | "
                     f"{c['batch_top1_agreement']:.2%} of {c['batch_steps']} | "
                     f"{', '.join(str(g) for g in (c['mismatch_logit_gaps'] + c['batch_mismatch_logit_gaps'])[:8])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
