"""runtime.engine against the reference path (the fixture model's own forward/generate/chat), on CPU.

The fixture model follows ChatGLM-6B's arithmetic (2D rotary, alpha-scaled residuals, bidirectional
context), so the engine agreeing with it here is evidence for the real model too. The CUDA tests
at the end run where a GPU is (the device runs them; CI skips them).
"""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

if "transformers" not in sys.modules and "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="engine-hf-modules-")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from lab.fixtures import build  # noqa: E402
from lab.fixtures.corpus import CONVERSATION, EXTRA_PAIRS  # noqa: E402
from runtime.engine import Engine, build_prompt, dequantize  # noqa: E402

QUERIES = [q for q, _ in CONVERSATION + EXTRA_PAIRS]
STEPS = 40


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return build.build_fixtures(tmp_path_factory.mktemp("engine-models"))


@pytest.fixture(scope="module")
def loaded(repos):
    cache = {}

    def load(variant, device="cpu"):
        if (variant, device) not in cache:
            directory = repos[variant]["dir"]
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
            model = AutoModel.from_pretrained(directory, trust_remote_code=True)
            model = (model.half().cuda() if device == "cuda" else model.float()).eval()
            if device == "cuda" and variant != "fp16":
                use_host_built_kernels(model)
            cache[variant, device] = tokenizer, model
        return cache[variant, device]

    return load


def use_host_built_kernels(model):
    """The fixture's int kernels are sm_80 machine code only (like upstream's): on newer GPUs the
    reference path needs the ones the deploy's GPU-kernel stage builds from
    data/kernels/quantization_kernels.cu, here a fatbin named by CHATGLM_KERNEL_FATBIN."""
    fatbin = os.environ.get("CHATGLM_KERNEL_FATBIN")
    if torch.cuda.get_device_capability() >= (9, 0):
        if not fatbin:
            pytest.skip("set CHATGLM_KERNEL_FATBIN to a fatbin of data/kernels/quantization_kernels.cu for this GPU")
        quantization = sys.modules[model.__module__.rsplit(".", 1)[0] + ".quantization"]
        with open(fatbin, "rb") as f:
            quantization.kernels = quantization.Kernel(f.read(), quantization._CUDA_FUNCTIONS)


def prompts(tokenizer):
    """Prompts of different lengths, with and without history."""
    texts = [build_prompt(q) for q in QUERIES[:4]]
    texts.append(build_prompt(QUERIES[2], CONVERSATION[:2]))
    return [tokenizer(text)["input_ids"] for text in texts]


def reference_greedy(model, ids, steps):
    """Greedy tokens of the reference path, `steps` of them whatever they are: the model's own
    forward with its growing cache, step by step, as its chat() runs it."""
    sequence = torch.tensor([ids], device=model.device)
    tokens, past = [], None
    with torch.no_grad():
        for _ in range(steps):
            if past is None:
                output = model(input_ids=sequence, use_cache=True)
            else:
                output = model(input_ids=sequence[:, -1:], past_key_values=past,
                               position_ids=model.next_position_ids(sequence), use_cache=True)
            past = output.past_key_values
            token = output.logits[:, -1].float().argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
            sequence = torch.cat((sequence, token), dim=1)
    return tokens


def generate_greedy(model, ids, steps):
    """transformers' generate(do_sample=False) over the model: stops after the eos token."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device), do_sample=False, max_new_tokens=steps)
    return out[0, len(ids):].tolist()


def engine_greedy(engine, ids, steps):
    return engine.generate(ids, max_new_tokens=steps, stop_ids=[])


def top1_agreement(model, engine, ids, steps):
    """Fraction of steps where the engine's top-1 equals the reference's, both fed the
    reference's tokens (teacher forcing), so one early difference cannot spoil the rest."""
    reference = reference_greedy(model, ids, steps)
    slot = engine.add(ids, max_new_tokens=steps, stop_ids=[])
    mine = [t for _, t, _ in engine.step()]
    for token in reference[:-1]:
        mine += [t for _, t, _ in engine.step(force={slot: token})]
    engine.cancel(slot)
    return sum(a == b for a, b in zip(mine, reference)) / len(reference), reference, mine


def test_greedy_fp_equals_reference(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=4, max_len=256)
    stopped = 0
    for ids in prompts(tokenizer):
        assert engine_greedy(engine, ids, STEPS) == reference_greedy(model, ids, STEPS)
        with_stop = engine.generate(ids, max_new_tokens=STEPS)  # stops on eos, like generate()
        assert with_stop == generate_greedy(model, ids, STEPS)
        stopped += with_stop[-1] == model.config.eos_token_id
    assert stopped  # the eos stop was exercised
    assert engine.free_slots == 4


def test_chat_matches_reference_chat(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=2, max_len=256)
    history = []
    for query, answer in CONVERSATION[:3]:
        response, new_history = engine.chat(query, history, max_new_tokens=64, do_sample=False)
        expected, _ = model.chat(tokenizer, query, history=history, do_sample=False)
        assert response == expected == answer  # the fixture learnt these answers
        assert new_history == history + [(query, response)]
        history = new_history


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_top1_agrees(loaded, variant):
    tokenizer, model = loaded(variant)
    engine = Engine(model, tokenizer, max_batch=2, max_len=256)
    assert engine.layers[0]["qkv"].bits == build.VARIANTS[variant][1]
    total = agree = 0
    for ids in prompts(tokenizer):
        share, reference, mine = top1_agreement(model, engine, ids, STEPS)
        total += len(reference)
        agree += share * len(reference)
    assert agree / total >= 0.99


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_matches_build_reference(bits):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits))
    packed, scale = build.quantize_rows(weight, bits)
    assert torch.equal(dequantize(packed, scale, bits, torch.float32), build.unpack_rows(packed, scale, bits))


def test_batched_decode_equals_each_alone(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=8, max_len=256)
    all_ids = prompts(tokenizer)
    alone = [engine_greedy(engine, ids, STEPS) for ids in all_ids]
    # Staggered starts: sequences join while others are mid-way (continuous batching).
    got, slots, pending = {}, {}, list(enumerate(all_ids))
    budget = {i: STEPS - 7 * (i % 2) for i in range(len(all_ids))}
    while pending or engine.active:
        if pending:
            index, ids = pending.pop(0)
            slots[engine.add(ids, max_new_tokens=budget[index], stop_ids=[])] = index
            got[index] = []
        for slot, token, finished in engine.step():
            got[slots[slot]].append(token)
            if finished:
                del slots[slot]
    for index, tokens in got.items():
        assert tokens == alone[index][:budget[index]]


def test_prompts_added_together_equal_each_alone(loaded):
    """Prompts of different lengths added between two steps run as one padded prefill; each
    sequence's tokens are exactly those it gets alone. A small max_len splits them into groups."""
    tokenizer, model = loaded("fp16")
    all_ids = prompts(tokenizer)
    assert len({len(ids) for ids in all_ids}) > 1  # the padding is exercised
    longest = max(len(ids) for ids in all_ids)
    for max_len in (len(all_ids) * longest + STEPS, 2 * longest + STEPS):
        engine = Engine(model, tokenizer, max_batch=8, max_len=max_len)
        alone = [engine_greedy(engine, ids, STEPS) for ids in all_ids]
        groups = engine._prefill_groups([engine._sequences[engine.add(ids, max_new_tokens=1)] for ids in all_ids])
        assert all(len(g) * max(len(s.prompt) for s in g) <= max_len for g in groups)
        assert (len(groups) == 1) == (max_len > 2 * longest + STEPS)
        engine.step()
        slots = {engine.add(ids, max_new_tokens=STEPS, stop_ids=[]): i for i, ids in enumerate(all_ids)}
        got = {i: [] for i in slots.values()}
        first = engine.step()
        assert [slot for slot, _, _ in first] == sorted(slots)  # every first token in the step after add()
        for slot, token, _ in first:
            got[slots[slot]].append(token)
        while engine.active:
            for slot, token, _ in engine.step():
                got[slots[slot]].append(token)
        assert [got[i] for i in range(len(all_ids))] == alone


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_dense_weights_same_tokens(loaded, variant, monkeypatch):
    """Quantized weights dequantized once give exactly the tokens of dequantizing per use; by
    default only when the float copy fits half of the available memory."""
    tokenizer, model = loaded(variant)
    dense = Engine(model, tokenizer, max_batch=4, max_len=256, dense_weights=True)
    per_use = Engine(model, tokenizer, max_batch=4, max_len=256, dense_weights=False)
    qkv = model.transformer.layers[0].attention.query_key_value
    assert dense.dense_bytes >= qkv.weight.shape[0] * qkv.weight.shape[1] * 8 // qkv.weight_bit_width * 4
    assert dense.layers[0]["qkv"].weight is not None and per_use.dense_bytes == 0
    assert per_use.layers[0]["qkv"].weight is None
    for ids in prompts(tokenizer):
        assert engine_greedy(dense, ids, STEPS) == engine_greedy(per_use, ids, STEPS)
    from runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "available_memory", lambda: 2 * dense.dense_bytes)
    assert Engine(model, tokenizer, max_batch=1, max_len=64).dense_bytes == dense.dense_bytes
    monkeypatch.setattr(engine_module, "available_memory", lambda: 2 * dense.dense_bytes - 1)
    assert Engine(model, tokenizer, max_batch=1, max_len=64).dense_bytes == 0


def test_cancel_frees_slot(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=2, max_len=256)
    first, second = prompts(tokenizer)[:2]
    a = engine.add(first, max_new_tokens=50, stop_ids=[])
    b = engine.add(second, max_new_tokens=50, stop_ids=[])
    assert engine.free_slots == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        engine.add(first)
    engine.step()
    engine.cancel(a)
    assert engine.free_slots == 1 and engine.active == [b]
    events = engine.step()
    assert [slot for slot, _, _ in events] == [b]
    c = engine.add(first, max_new_tokens=STEPS, stop_ids=[])
    assert c == a  # the freed slot is reused, and its old cache rows do not leak into the new run
    tokens = {c: [], b: []}
    while engine.active:
        for slot, token, _ in engine.step():
            tokens[slot].append(token)
    assert tokens[c] == reference_greedy(model, first, STEPS)
    assert engine.free_slots == 2


def test_finishes_on_stop_token_and_length(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=2, max_len=256)
    ids = prompts(tokenizer)[0]
    reference = reference_greedy(model, ids, 12)
    stop = reference[5]
    tokens = engine.generate(ids, max_new_tokens=12, stop_ids=[stop])
    assert tokens == reference[:reference.index(stop) + 1]
    # A sequence stops when its cache row is full.
    short = Engine(model, tokenizer, max_batch=1, max_len=len(ids) + 3)
    assert len(short.generate(ids, max_new_tokens=50, stop_ids=[])) == 4


def test_sampling_is_seeded_per_sequence(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=4, max_len=256)
    ids = prompts(tokenizer)[1]
    one = engine.generate(ids, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=7, stop_ids=[])
    assert one == engine.generate(ids, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=7, stop_ids=[])
    assert one != engine.generate(ids, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=8, stop_ids=[])
    # top_p that keeps only the best token is greedy.
    assert engine.generate(ids, max_new_tokens=30, temperature=1.0, top_p=1e-6, seed=3, stop_ids=[]) == \
        engine_greedy(engine, ids, 30)
    # Batched with others, a seeded sequence draws the same tokens as alone.
    slots = {engine.add(ids, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=7, stop_ids=[]): []}
    slots[engine.add(prompts(tokenizer)[0], max_new_tokens=30, temperature=1.5, top_p=0.95, stop_ids=[])] = []
    while engine.active:
        for slot, token, _ in engine.step():
            slots[slot].append(token)
    assert one in slots.values()


def test_prompt_must_end_in_glm_marks(loaded):
    tokenizer, model = loaded("fp16")
    engine = Engine(model, tokenizer, max_batch=1, max_len=32)
    with pytest.raises(ValueError, match="<sop>"):
        engine.add([10, 11, 12])
    with pytest.raises(ValueError, match="max_len"):
        engine.add([10] * 40 + [tokenizer.gmask_token_id, tokenizer.bos_token_id])


# --- on a CUDA GPU (the device machine runs these; CI has none) -------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("variant", ["fp16", "int8", "int4"])
def test_cuda_graph_engine_agrees_with_reference(loaded, variant):
    tokenizer, model = loaded(variant, "cuda")
    engine = Engine(model, tokenizer, max_batch=4, max_len=256)
    assert engine.use_graphs and engine.use_kernels
    total = agree = 0
    for ids in prompts(tokenizer):
        share, reference, _ = top1_agreement(model, engine, ids, STEPS)
        total += len(reference)
        agree += share * len(reference)
        if variant == "fp16":
            assert engine_greedy(engine, ids, STEPS) == reference_greedy(model, ids, STEPS)
    assert agree / total >= 0.99


@cuda
def test_cuda_batched_graph_equals_alone(loaded):
    tokenizer, model = loaded("int4", "cuda")
    engine = Engine(model, tokenizer, max_batch=8, max_len=256)
    all_ids = prompts(tokenizer)
    alone = [engine_greedy(engine, ids, STEPS) for ids in all_ids]
    slots = {engine.add(ids, max_new_tokens=STEPS, stop_ids=[]): i for i, ids in enumerate(all_ids)}
    got = {i: [] for i in range(len(all_ids))}
    while engine.active:
        for slot, token, _ in engine.step():
            got[slots[slot]].append(token)
    # Batched rows go through the tensor-core kernel, single rows through the GEMV one: the sums
    # differ in order, so compare top-1 agreement rather than exact equality.
    same = sum(a == b for i in got for a, b in zip(got[i], alone[i]))
    assert same / sum(len(t) for t in got.values()) >= 0.9


@cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("magic", [True, False])
@pytest.mark.parametrize("variant", [0, 1, 2, 3])
def test_qlinear_kernel_matches_dequantized_matmul(bits, rows, magic, variant):
    from runtime import kernels

    generator = torch.Generator(device="cuda").manual_seed(bits * 100 + rows)
    n, k = 384, 1024
    weight = torch.randn(n, k, device="cuda", generator=generator)
    packed, scale = build.quantize_rows(weight, bits)
    x = torch.randn(rows, k, device="cuda", generator=generator).half()
    bias = torch.randn(n, device="cuda", generator=generator).half()
    residual = torch.randn(rows, n, device="cuda", generator=generator).half()
    dense = dequantize(packed, scale, bits, torch.float32)
    expected = (x.float() @ dense.t() + bias.float()).half().float()
    # The plain layouts, weights unpacked in memory order (join) on CUDA cores or tensor cores, and
    # weights read as 32-bit words (one row; more rows fall back to the tensor-core layout).
    config = [(16, 256, 4, 3, magic) if rows == 1 else (32, 128, 4, 3, False),
              (16, 256, 4, 3, magic, True, False), (32, 128, 4, 3, magic, True, True),
              (8, 512, 4, 3, magic, False, False, True)][variant]
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.half)  # every element must be written
    kernels.qlinear(x, packed, scale, bits, bias=bias, config=config, out=out)
    assert (out.float() - expected).norm() / expected.norm() < 2e-3
    gelu = kernels.qlinear(x, packed, scale, bits, bias=bias, gelu=True, config=config).float()
    reference = torch.nn.functional.gelu(expected, approximate="tanh")
    assert (gelu - reference).norm() / reference.norm() < 2e-3
    mixed = kernels.qlinear(x, packed, scale, bits, bias=bias, residual=residual, alpha=7.5, config=config).float()
    reference = residual.float() * 7.5 + expected
    assert (mixed - reference).norm() / reference.norm() < 2e-3


@cuda
def test_decode_attention_kernel_matches_torch(loaded):
    tokenizer, model = loaded("fp16", "cuda")
    kernel_engine = Engine(model, tokenizer, max_batch=4, max_len=128, graphs=False)
    torch_engine = Engine(model, tokenizer, max_batch=4, max_len=128, graphs=False, use_kernels=False)
    assert kernel_engine.use_kernels and not torch_engine.use_kernels
    for ids in prompts(tokenizer)[:3]:
        assert engine_greedy(kernel_engine, ids, STEPS) == engine_greedy(torch_engine, ids, STEPS)
