"""Tests of the tiny ChatGLM fixture repos built by lab.fixtures.build."""
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# transformers copies remote code into HF_MODULES_CACHE and the int4/int8 kernels compile there;
# keep that out of ~/.cache unless transformers was already imported by an earlier test module.
if "transformers" not in sys.modules and "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="fixture-hf-modules-")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizer  # noqa: E402

from lab.fixtures import build  # noqa: E402
from lab.fixtures.corpus import CONVERSATION  # noqa: E402

BITS = {"int8": 8, "int4": 4}
QUERIES = [query for query, _ in CONVERSATION]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return build.build_fixtures(tmp_path_factory.mktemp("models"))


def load(directory):
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = AutoModel.from_pretrained(directory, trust_remote_code=True).float().eval()
    return tokenizer, model


def quantization_module(model):
    return sys.modules[model.__module__.rsplit(".", 1)[0] + ".quantization"]


def test_repo_layout(fixtures):
    assert set(fixtures) == {"fp16", "int8", "int4"}
    common = {"config.json", "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py",
              "tokenization_chatglm.py", "tokenizer_config.json", "ice_text.model"}
    for variant, info in fixtures.items():
        directory = Path(info["dir"])
        files = {p.name for p in directory.iterdir()}
        assert common <= files
        assert set(info["weights"]) <= files and "ice_text.model" in info["weights"]
        config = json.loads((directory / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
        assert tokenizer_config["auto_map"]["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer", None]
        quantization = (directory / "quantization.py").read_text()
        if variant == "fp16":
            assert info["weights"][1:] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
            index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
            assert set(index["weight_map"].values()) == set(info["weights"][1:])
            assert "quantization_bit" not in config
            assert "def quantize(model, weight_bit_width, empty_init=False, **kwargs):" in quantization
            assert "CPUKernel" not in quantization
        else:
            assert info["weights"][1:] == ["pytorch_model.bin"]
            assert config["quantization_bit"] == BITS[variant] and config["quantization_embeddings"] is False
            assert {"quantization_kernels.c", "quantization_kernels_parallel.c"} <= files
            assert "    load_cpu_kernel(**kwargs)\n" in quantization


def test_source_quantization_embeds_current_kernels():
    # Run `python -m lab.fixtures.build --sync-source` after editing the .c files.
    assert build.render_quantization() == (build.SOURCE / "quantization.py").read_text(encoding="utf-8")


def test_prompt_format():
    from lab.fixtures.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration as Model

    assert Model.build_prompt("你好！") == "你好！"
    assert Model.build_prompt("q2", [("q0", "r0"), ("q1", "r1")]) == (
        "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答："
    )


@pytest.mark.parametrize("variant", ["fp16", "int8", "int4"])
def test_load_and_chat(fixtures, variant, capfd):
    directory = fixtures[variant]["dir"]
    assert AutoConfig.from_pretrained(directory, trust_remote_code=True).model_type == "chatglm"
    tokenizer, model = load(directory)
    out = capfd.readouterr().out
    if variant in BITS:
        assert "No compiled kernel found." in out
        kernel = Path(quantization_module(model).cpu_kernels.kernel_file)
        assert kernel.suffix == ".so" and kernel.exists()
        assert kernel.parent == Path(quantization_module(model).__file__).parent
    else:
        assert "No compiled kernel found." not in out

    torch.manual_seed(0)
    history = []
    for turn, query in enumerate(QUERIES[:3], 1):
        response, history = model.chat(tokenizer, query, history=history)
        assert response.strip()
        assert len(history) == turn and history[-1] == (query, response)
    assert history[0][1] == CONVERSATION[0][1]  # trained answer survives quantization

    streamed = list(model.stream_chat(tokenizer, QUERIES[3], history=history, do_sample=False))
    assert len(streamed) > 1
    response, new_history = streamed[-1]
    assert response and new_history == history + [(QUERIES[3], response)]
    assert model.chat(tokenizer, QUERIES[3], history=history, do_sample=False)[0] == response


def test_half_conversion(fixtures):
    tokenizer, model = load(fixtures["int4"]["dir"])
    model.half()
    layer = model.transformer.layers[0].attention.query_key_value
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.half
    assert model.chat(tokenizer, QUERIES[0], do_sample=False)[0]


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantize_with_kernel_file_skips_compile(fixtures, variant, capfd):
    tokenizer, model = load(fixtures[variant]["dir"])
    quantization = quantization_module(model)
    kernel_file = os.path.abspath(quantization.cpu_kernels.kernel_file)
    capfd.readouterr()
    model.quantize(BITS[variant], kernel_file=kernel_file)
    out = capfd.readouterr().out
    assert "No compiled kernel found." not in out and "Compiling" not in out
    assert quantization.cpu_kernels.load and quantization.cpu_kernels.kernel_file == kernel_file
    assert model.chat(tokenizer, QUERIES[0], do_sample=False)[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_kernel_matches_torch_reference(fixtures, bits, monkeypatch):
    tokenizer, model = load(fixtures["int{}".format(bits)]["dir"])
    quantization = quantization_module(model)
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(24, 48, generator=generator)
    packed, scale = build.quantize_rows(weight, bits)

    expected = build.unpack_rows(packed, scale, bits)
    assert torch.equal(quantization.extract_weight_to_float(packed, scale, bits), expected)
    layer = quantization.QuantizedLinear(bits, weight, torch.zeros(24))
    assert torch.equal(layer.weight.data, packed)  # C packing == reference packing
    x = torch.randn(3, 48, generator=generator)
    assert torch.allclose(layer(x), x @ expected.t(), atol=1e-5)

    # The loaded model's layers go through the C library and agree with a dequantized fp model.
    calls = []
    name = "extract_int{}_weight_to_float".format(bits)
    real = getattr(quantization.cpu_kernels, name)
    monkeypatch.setattr(quantization.cpu_kernels, name, lambda *args: calls.append(1) or real(*args))
    _, reference = load(fixtures["fp16"]["dir"])
    state = torch.load(Path(fixtures["int{}".format(bits)]["dir"]) / "pytorch_model.bin")
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith("weight_scale"):
                target = reference.get_parameter(key[: -len("_scale")])
                target.copy_(build.unpack_rows(state[key[: -len("_scale")]], tensor, bits))
        ids = tokenizer([QUERIES[1]], return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits
        assert torch.allclose(logits, reference(input_ids=ids).logits, atol=1e-4)
    assert len(calls) == 4 * model.config.num_layers


def test_parallel_kernel_compiles_with_openmp(fixtures, capfd):
    _, model = load(fixtures["int4"]["dir"])
    quantization = quantization_module(model)
    kernel = quantization.CPUKernel(compile_parallel_kernel=True, parallel_num=2)
    out = capfd.readouterr().out
    assert "No compiled kernel found." in out and "quantization_kernels_parallel.c" in out
    assert kernel.load and kernel.kernel_file.endswith("quantization_kernels_parallel.so")
    assert kernel.get_num_threads() == 2
    packed, scale = build.quantize_rows(torch.randn(16, 32), 4)
    result, scale_float = torch.empty(16, 32), scale.float().contiguous()
    kernel.extract_int4_weight_to_float(packed.data_ptr(), scale_float.data_ptr(), result.data_ptr(), 16, 16)
    assert torch.equal(result, build.unpack_rows(packed, scale, 4))


def test_fp16_repo_quantize_needs_gpu(fixtures):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    _, model = load(fixtures["fp16"]["dir"])
    with pytest.raises(RuntimeError, match="CUDA"):
        model.quantize(4)


def test_tokenizer(fixtures, monkeypatch):
    directory = fixtures["fp16"]["dir"]
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    text = "[Round 0]\n问：你好！\n答：\tok  two spaces"
    ids = tokenizer(text)["input_ids"]
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert tokenizer.decode(ids[:-2]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<eop>"

    # transformers >= 4.34 asks for the vocabulary inside PreTrainedTokenizer.__init__.
    original = PreTrainedTokenizer.__init__

    def init_like_434(self, **kwargs):
        self.get_vocab()
        original(self, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizer, "__init__", init_like_434)
    assert AutoTokenizer.from_pretrained(directory, trust_remote_code=True).vocab_size == tokenizer.vocab_size
