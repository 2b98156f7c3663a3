"""Fast generation for a loaded ChatGLM-6B model: static KV cache, batched decode, CUDA graphs.

The engine reads the weights of a model loaded the usual way (AutoModel.from_pretrained(...,
trust_remote_code=True), then .half().cuda() or .float()); it copies none of them, so it costs
only its KV cache in memory. Upstream's own model.chat() stays usable beside it, as the reference
and the fallback.

    engine = Engine(model, tokenizer, device="cuda", max_batch=16, max_len=2048)
    slot = engine.add(prompt_ids, max_new_tokens=256, temperature=0.95, top_p=0.7, seed=1)
    while engine.active:
        for slot, token_id, finished in engine.step():
            ...                       # stream token_id of sequence `slot`; a finished slot is free again
    engine.cancel(slot)               # drop a sequence at any time; its slot is free at once
    engine.free_slots                 # how many more sequences add() takes now
    text, history = engine.chat("你好", history=[], max_new_tokens=256)   # upstream chat()'s prompt format

Continuous batching: add() and cancel() may be called between any two step() calls. add() takes
a slot at once; the next step() runs the prompts of every sequence added since the step before
together (prefill: padded to the longest, each prompt attending to its own tokens only, in groups
of at most max_len tokens in all so that a batch costs no more memory than one prompt of max_len)
and reports each one's first token, beside one more token for every sequence already running (all
of them in one batched forward pass). So requests that arrive while others generate wait for one
step, not for the others to finish. A sequence finishes on a stop token (reported, with
finished=True; default: the model's eos <eop>), after max_new_tokens tokens, or when its cache row
is full (max_len). The engine is not thread-safe: drive it from one thread.

Sampling per sequence: temperature <= 0 is greedy (argmax, the same tokens as upstream's
chat(do_sample=False)); otherwise softmax(logits / temperature) restricted to the smallest set of
tokens whose probability reaches top_p, drawn with the sequence's own generator (seed).

Devices:
- CUDA: fp16 weights use cuBLAS; int8/int4 weights (upstream's QuantizedLinear: int8 `weight`,
  fp16 `weight_scale`, `weight_bit_width`) use runtime.kernels' fused dequantize-and-multiply, so
  the packed weights are read once per step and never expanded to fp16. Attention of the decode
  step is one Triton kernel (rotary, cache write and attention), and the whole decode step is a
  CUDA graph per batch size bucket (1, 2, 4, 8, 16, ...), captured on first use or by warmup().
  Without Triton, or with graphs=False, the same step runs eagerly through torch.
- CPU: plain torch, eager, float32 (or whatever dtype the model has); the attention of a decode
  step is one batched computation over all sequences (keys padded to the longest, the padding
  masked). int8/int4 weights are dequantized once, when the engine is made, if that float copy
  takes at most half of the memory available then (dense_weights=None, the default; for the
  int4 ChatGLM-6B that is 22.5 GB of float32: 45 GB available or more); otherwise, or with
  dense_weights=False, per use like upstream's CPU path: the same arithmetic either way, the
  dense copy spares every step the unpacking of all weights.

Memory (besides any dense copy above): the KV cache holds 2 * layers * (max_batch + 1) * max_len *
hidden values in the model's dtype: for ChatGLM-6B in fp16 and max_len 2048, 0.94 GB per slot
(15 GB for 16 slots).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it.
    from . import kernels as _kernels
except Exception:  # ImportError, or triton failing to find a GPU/compiler
    _kernels = None

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# On CPU, quantized weights are dequantized once when their float copy takes at most this share
# of the memory available at that moment (the rest stays for the KV cache, the requests and the
# other programs of the host).
DENSE_SHARE = 0.5


@dataclass
class _Linear:
    bias: Optional[torch.Tensor]
    weight: Optional[torch.Tensor] = None      # float weights (N, K)
    packed: Optional[torch.Tensor] = None      # int8 (N, K * bits / 8)
    scale: Optional[torch.Tensor] = None       # (N,)
    bits: int = 0                              # kept when made dense: _linear keeps upstream's order

    @classmethod
    def of(cls, module):
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.data
        bits = int(getattr(module, "weight_bit_width", 0) or 0)
        if bits:
            return cls(bias=bias, packed=module.weight.data, scale=module.weight_scale.data, bits=bits)
        return cls(bias=bias, weight=module.weight.data)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The float weights of an int8/int4 layer (int4: high nibble first, signed; one scale per row)."""
    wide = packed.to(torch.int16)
    if bits == 4:
        high = wide >> 4                    # arithmetic shift: the signed high nibble
        low = ((wide & 0xF) ^ 8) - 8        # the low nibble, sign-extended
        wide = torch.stack((high, low), dim=-1).view(packed.shape[0], -1)
    return wide.to(dtype) * scale.to(dtype)[:, None]


def available_memory() -> int:
    """Bytes of memory the kernel says can be had without swapping (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class _Sequence:
    slot: int
    length: int                 # tokens in this slot's cache
    context: int                # index of <sop>: tokens before it form the bidirectional context
    mask_position: int          # where [gMASK] stands: every generated token's position
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: frozenset
    generator: Optional[torch.Generator]
    prompt: Optional[List[int]] = None    # the prompt until the next step() has run it
    token: int = -1             # the last token picked, fed to the next step
    produced: int = 0
    tokens: List[int] = field(default_factory=list)


class Engine:
    def __init__(self, model, tokenizer=None, device=None, max_batch: int = 16, max_len: int = 2048,
                 graphs: Optional[bool] = None, use_kernels: Optional[bool] = None,
                 dense_weights: Optional[bool] = None):
        config = model.config
        transformer = model.transformer
        self.model, self.tokenizer, self.config = model, tokenizer, config
        embedding = transformer.word_embeddings
        self.device = torch.device(device) if device is not None else embedding.weight.device
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.eps = config.layernorm_epsilon
        self.alpha = (2 * config.num_layers) ** 0.5
        self.max_batch, self.max_len = max_batch, max_len
        self.bos_id, self.gmask_id = config.bos_token_id, config.gmask_token_id
        self.mask_id = getattr(config, "mask_token_id", None)
        self.eos_id = config.eos_token_id

        if getattr(embedding, "weight_bit_width", 0):  # quantized embeddings: rows are read, not multiplied
            self.embedding = dequantize(embedding.weight.data, embedding.weight_scale.data,
                                        embedding.weight_bit_width, torch.float16 if self.device.type == "cuda" else torch.float32)
        else:
            self.embedding = embedding.weight.data
        self.dtype = self.embedding.dtype
        self.layers = []
        for layer in transformer.layers:
            self.layers.append(dict(
                ln1=(layer.input_layernorm.weight.data, layer.input_layernorm.bias.data),
                qkv=_Linear.of(layer.attention.query_key_value),
                dense=_Linear.of(layer.attention.dense),
                ln2=(layer.post_attention_layernorm.weight.data, layer.post_attention_layernorm.bias.data),
                up=_Linear.of(layer.mlp.dense_h_to_4h),
                down=_Linear.of(layer.mlp.dense_4h_to_h)))
        self.final_ln = (transformer.final_layernorm.weight.data, transformer.final_layernorm.bias.data)
        self.lm_head = _Linear.of(model.lm_head)

        cuda = self.device.type == "cuda"
        if use_kernels is None:
            use_kernels = cuda and _kernels is not None and self.dtype == torch.float16
        if use_kernels and _kernels is None:
            raise RuntimeError("runtime.kernels needs triton, which is not importable here")
        self.use_kernels = bool(use_kernels)
        # Graphs need the kernel attention: torch's attention has data-dependent shapes.
        self.use_graphs = self.use_kernels if graphs is None else (bool(graphs) and self.use_kernels)
        self.dense_bytes = self._make_dense(dense_weights)

        # Rotary tables in the model's dtype, made on the device the way the reference makes them.
        rotary_dim = self.head_dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=self.device).float() / rotary_dim))
        freqs = torch.arange(max_len + 1, device=self.device).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype).contiguous(), emb.sin().to(self.dtype).contiguous()
        quarter = rotary_dim // 2
        first, second = torch.arange(quarter), torch.arange(quarter, rotary_dim)
        self._turn_order = torch.cat((second, first, second + rotary_dim, first + rotary_dim)).to(self.device)
        self._turn_sign = torch.tensor(([-1.0] * quarter + [1.0] * quarter) * 2, dtype=self.dtype, device=self.device)

        # One extra slot (index max_batch) takes the writes of padding rows in graph buckets.
        shape = (len(self.layers), max_batch + 1, self.heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._sequences: Dict[int, _Sequence] = {}
        # Static inputs of the decode step: token, slot, cached length, position, block position.
        # Rows padded to 16 entries: Triton specialises on 16-byte aligned pointers, and the
        # deploy-time warm-up compiled for aligned ones.
        width = -(-max_batch // 16) * 16
        self._inputs = torch.zeros(5, width, dtype=torch.int32, device=self.device)
        self._staging = torch.zeros(5, width, dtype=torch.int32, pin_memory=cuda)
        self._staging_np = self._staging.numpy()  # element writes through numpy cost nanoseconds
        self._graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # Logits of the last decode step: one row per sequence it decoded, in slot order (the order
        # of its events), valid until the next step.
        self.last_logits: Optional[torch.Tensor] = None
        self._pool = None

    def _make_dense(self, wanted: Optional[bool]) -> int:
        """Dequantize the quantized layers once, on CPU, when wanted (None: when the float copy
        takes at most DENSE_SHARE of the available memory); returns the bytes that copy takes."""
        quantized = [linear for layer in self.layers for linear in layer.values()
                     if isinstance(linear, _Linear) and linear.bits] + ([self.lm_head] if self.lm_head.bits else [])
        size = sum(linear.packed.shape[0] * linear.packed.shape[1] * 8 // linear.bits for linear in quantized)
        size *= self.dtype.itemsize
        if wanted is None:
            wanted = self.device.type == "cpu" and size <= DENSE_SHARE * available_memory()
        if not (wanted and quantized) or self.use_kernels:
            return 0
        for linear in quantized:
            linear.weight = dequantize(linear.packed, linear.scale, linear.bits, self.dtype)
        return size

    # --- public API -----------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._sequences)

    @property
    def active(self) -> List[int]:
        return sorted(self._sequences)

    def add(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None) -> int:
        """Start a sequence from token ids that end in [gMASK] <sop> (what the ChatGLM tokenizer
        returns for a prompt); returns its slot. The next step() runs the prompt, with those of
        every other sequence added since the last step, and reports its first token."""
        ids = [int(i) for i in prompt_ids]
        if self.bos_id not in ids:
            raise ValueError("prompt_ids must hold <sop> (the tokenizer adds [gMASK] <sop> at the end)")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_len={self.max_len}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        free = [s for s in range(self.max_batch) if s not in self._sequences]
        if not free:
            raise RuntimeError("no free slot: wait for a sequence to finish or cancel one")
        slot = free[0]
        context = ids.index(self.bos_id)
        marks = [i for i, t in enumerate(ids[:context]) if t in (self.gmask_id, self.mask_id)]
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        sequence = _Sequence(slot=slot, length=len(ids), context=context,
                             mask_position=marks[0] if marks else max(context - 1, 0),
                             max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                             stop_ids=frozenset([self.eos_id] if stop_ids is None else stop_ids), generator=generator,
                             prompt=ids)
        self._sequences[slot] = sequence
        return slot

    def cancel(self, slot: int) -> None:
        """Forget a sequence; its slot is free at once. Unknown or finished slots are ignored."""
        self._sequences.pop(slot, None)

    def step(self, force: Optional[Dict[int, int]] = None) -> List[Tuple[int, int, bool]]:
        """One token for every active sequence: [(slot, token_id, finished)]. Finished slots are free.

        force {slot: token} feeds that token instead of the one the slot picked last (teacher
        forcing: how checks compare the engine's choices with a reference's, step by step)."""
        events = []
        ordered = [self._sequences[slot] for slot in sorted(self._sequences)]
        fresh = [s for s in ordered if s.prompt is not None]
        running = [s for s in ordered if s.prompt is None]
        for slot, token in (force or {}).items():
            if slot in self._sequences:
                self._sequences[slot].token = int(token)
        with torch.inference_mode():
            for group in self._prefill_groups(fresh):
                picked = self._pick(self._prefill(group), group)
                for sequence, token in zip(group, picked):
                    sequence.prompt = None
                    sequence.token = token
                    sequence.produced = 1
                    sequence.tokens.append(token)
                    events.append(sequence)
            picked = self._pick(self._decode(running), running) if running else []
        for sequence, token in zip(running, picked):
            sequence.length += 1            # the fed token is in the cache now
            sequence.token = token
            sequence.produced += 1
            sequence.tokens.append(token)
            events.append(sequence)
        out = []
        for sequence in sorted(events, key=lambda s: s.slot):
            finished = self._done(sequence)
            out.append((sequence.slot, sequence.token, finished))
            if finished:
                self._sequences.pop(sequence.slot, None)
        return out

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, **kwargs) -> List[int]:
        """The tokens of one sequence run alone to its end (stop token included)."""
        if self._sequences:
            raise RuntimeError("generate()/chat() drive the engine alone; other sequences are active")
        slot = self.add(prompt_ids, max_new_tokens=max_new_tokens, **kwargs)
        tokens = []
        while slot in self._sequences:
            for _, token, _ in self.step():
                tokens.append(token)
        return tokens

    def chat(self, query: str, history: Optional[List[Tuple[str, str]]] = None, max_new_tokens: int = 2048,
             temperature: float = 0.95, top_p: float = 0.7, do_sample: bool = True, seed: Optional[int] = None):
        """upstream chat()'s prompt and return value: (response, history + [(query, response)])."""
        if self.tokenizer is None:
            raise RuntimeError("chat() needs the tokenizer")
        history = list(history or [])
        prompt_ids = self.tokenizer(build_prompt(query, history))["input_ids"]
        stop = {self.eos_id}
        end_id = getattr(self.tokenizer, "end_token_id", None)
        if end_id is not None:
            stop.add(end_id)
        budget = max(1, min(max_new_tokens, self.max_len - len(prompt_ids)))
        tokens = self.generate(prompt_ids, max_new_tokens=budget, temperature=temperature if do_sample else 0.0,
                               top_p=top_p, seed=seed, stop_ids=stop)
        tokens = [t for t in tokens if t not in stop]
        response = self.tokenizer.decode(tokens).strip()
        return response, history + [(query, response)]

    def warmup(self, batch_sizes: Optional[Sequence[int]] = None) -> None:
        """Capture the decode graphs now (largest first, sharing one memory pool) instead of on
        first use."""
        if not self.use_graphs:
            return
        for size in sorted(batch_sizes or [b for b in BUCKETS if b <= self._bucket(self.max_batch)], reverse=True):
            self._graph(size)

    # --- model arithmetic -----------------------------------------------------------------------

    def _done(self, sequence: _Sequence) -> bool:
        # The last token goes into the cache at index `length` on the next step: it must fit.
        return (sequence.token in sequence.stop_ids or sequence.produced >= sequence.max_new_tokens
                or sequence.length >= self.max_len)

    def _linear(self, x, linear: _Linear, residual=None, gelu=False, out=None):
        """x @ W^T + b, then gelu or residual * alpha + (that), with the reference's roundings."""
        if linear.bits:
            if self.use_kernels and _kernels.fits(x.shape[0], *linear.packed.shape, linear.bits):
                return _kernels.qlinear(x, linear.packed, linear.scale, linear.bits, bias=linear.bias,
                                        residual=residual, alpha=self.alpha, gelu=gelu, out=out)
            # Upstream's order: dequantize, multiply, then add the bias.
            weight = linear.weight if linear.weight is not None else dequantize(linear.packed, linear.scale,
                                                                                linear.bits, x.dtype)
            y = torch.matmul(x, weight.t())
            if linear.bias is not None:
                y = y + linear.bias
        else:
            y = F.linear(x, linear.weight, linear.bias)
        if gelu:
            y = F.gelu(y, approximate="tanh")
        if residual is not None:
            y = residual * self.alpha + y
        return y

    def _rotary(self, positions, blocks):
        """GLM's 2D rotary tables for _rotate, (*positions.shape, head_dim): the first half of a
        head turns by the position, the second by the block position. Made once per forward pass."""
        cos = torch.cat((self.cos[positions], self.cos[blocks]), dim=-1)
        sin = torch.cat((self.sin[positions], self.sin[blocks]), dim=-1) * self._turn_sign
        return cos, sin

    def _rotate(self, x, rotary):
        """x * cos + (x with each half's two quarters swapped, the first negated) * sin: the
        reference's rotate-half in two multiplications and an addition per element (the sign
        rides on sin: (-a) * b == a * (-b) exactly)."""
        cos, sin = rotary
        return x * cos + x[..., self._turn_order] * sin

    def _prefill_groups(self, fresh: List[_Sequence]) -> List[List[_Sequence]]:
        """The new sequences in groups whose prompts, padded to the group's longest, hold at most
        max_len tokens: a group's attention scores take no more memory than one prompt's."""
        groups: List[List[_Sequence]] = []
        for sequence in fresh:
            group = groups[-1] if groups else None
            if group and (len(group) + 1) * max(len(s.prompt) for s in group + [sequence]) <= self.max_len:
                group.append(sequence)
            else:
                groups.append([sequence])
        return groups

    def _prefill(self, sequences: List[_Sequence]) -> torch.Tensor:
        """Run the prompts of new sequences together, right-padded to the longest (no real token
        sees the padding); fill their cache rows; return each prompt's last position's logits,
        one row per sequence."""
        batch, span = len(sequences), max(len(s.prompt) for s in sequences)
        tokens = torch.zeros(batch, span, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence.prompt)] = torch.tensor(sequence.prompt)
        facts = [[len(s.prompt), s.context, s.mask_position, s.slot] for s in sequences]
        lengths, context, mask_position, slots = torch.tensor(facts, device=self.device).split(1, dim=1)
        slots = slots[:, 0]
        steps = torch.arange(span, device=self.device)
        generated = steps >= context
        positions = torch.where(generated, mask_position, steps)[:, None]               # (batch, 1, span)
        blocks = torch.where(generated, steps - context + 1, torch.zeros_like(steps))[:, None]
        # Context keys are seen by every query; from <sop> on, attention is causal; no key of
        # the padding is seen.
        allowed = ((steps[None, :] <= steps[:, None]) | (steps < context)[:, None, :]) & (steps < lengths)[:, None, :]
        allowed = allowed[:, None]                                                      # (batch, 1, span, span)
        rotary = [table[..., None, :] for table in self._rotary(positions, blocks)]   # (batch, 1, span, 1, head_dim)
        x = F.embedding(tokens.view(-1).to(self.device), self.embedding)                 # (batch * span, hidden)
        for index, layer in enumerate(self.layers):
            normed = F.layer_norm(x, (self.hidden,), *layer["ln1"], self.eps)
            qkv = self._linear(normed, layer["qkv"]).view(batch, span, self.heads, 3, self.head_dim).transpose(1, 2)
            turned = self._rotate(qkv[..., :2, :], rotary)    # query and key: (batch, heads, span, 2, head_dim)
            query, key, value = turned[..., 0, :], turned[..., 1, :], qkv[..., 2, :]
            # Past a prompt's end its rows take the padding's keys: masked until overwritten.
            self.k_cache[index, slots, :, :span] = key
            self.v_cache[index, slots, :, :span] = value
            scores = torch.matmul(query / math.sqrt(self.head_dim), key.transpose(-1, -2)).float()
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1).to(value.dtype)
            attended = torch.matmul(probs, value).transpose(1, 2).reshape(batch * span, self.hidden)
            x = self._linear(attended, layer["dense"], residual=normed)
            normed = F.layer_norm(x, (self.hidden,), *layer["ln2"], self.eps)
            x = self._linear(self._linear(normed, layer["up"], gelu=True), layer["down"], residual=normed)
        last = x.view(batch, span, self.hidden)[torch.arange(batch, device=self.device), lengths[:, 0] - 1]
        x = F.layer_norm(last, (self.hidden,), *self.final_ln, self.eps)
        return self._linear(x, self.lm_head)

    def _decode_forward(self, inputs: torch.Tensor, batch: int) -> torch.Tensor:
        """One token for `batch` rows described by inputs[:, :batch] (token, slot, length,
        position, block position); returns logits (batch, vocab). Graph-safe with the kernels."""
        tokens, slots, lengths, positions, blocks = (inputs[i, :batch] for i in range(5))
        x = F.embedding(tokens.long(), self.embedding)
        plain = None if self.use_kernels else self._attention_inputs(slots, lengths, positions, blocks)
        for index, layer in enumerate(self.layers):
            normed = F.layer_norm(x, (self.hidden,), *layer["ln1"], self.eps)
            qkv = self._linear(normed, layer["qkv"])
            if self.use_kernels:
                # Few sequences: share each head's keys among several programs to fill the GPU.
                attend = _kernels.split_attention if batch * self.heads < _kernels.SPLIT_BELOW else _kernels.decode_attention
                attended = attend(qkv, self.k_cache[index], self.v_cache[index], self.cos, self.sin,
                                  slots, lengths, positions, blocks, self.heads)
            else:
                attended = self._torch_attention(index, qkv, *plain)
            x = self._linear(attended, layer["dense"], residual=normed)
            normed = F.layer_norm(x, (self.hidden,), *layer["ln2"], self.eps)
            x = self._linear(self._linear(normed, layer["up"], gelu=True), layer["down"], residual=normed)
        x = F.layer_norm(x, (self.hidden,), *self.final_ln, self.eps)
        return self._linear(x, self.lm_head)

    def _attention_inputs(self, slots, lengths, positions, blocks):
        """What _torch_attention needs of a decode step, the same for every layer: slots and
        lengths as indices, the rotary tables (batch, 1, 1, head_dim), how many cached keys the
        longest row has, and which keys are padding for each row (batch, 1, 1, span)."""
        slots, lengths = slots.long(), lengths.long()
        rotary = [table[:, None, None] for table in self._rotary(positions.long(), blocks.long())]
        span = int(lengths.max()) + 1
        padding = torch.arange(span, device=self.device) > lengths[:, None]
        return slots, lengths, rotary, span, padding[:, None, None, :]

    def _torch_attention(self, index, qkv, slots, lengths, rotary, span, padding):
        """The decode step's attention for all rows at once: each row's cached keys up to its own
        length, gathered padded to the longest, the padding masked out of the softmax."""
        batch = qkv.shape[0]
        qkv = qkv.view(batch, self.heads, 3, self.head_dim)
        turned = self._rotate(qkv[:, :, :2], rotary)          # query and key: (batch, heads, 2, head_dim)
        self.k_cache[index, slots, :, lengths] = turned[:, :, 1]
        self.v_cache[index, slots, :, lengths] = qkv[:, :, 2]
        keys = self.k_cache[index, slots, :, :span]                 # (batch, heads, span, head_dim)
        values = self.v_cache[index, slots, :, :span]
        scores = torch.matmul(turned[:, :, :1] / math.sqrt(self.head_dim), keys.transpose(-1, -2)).float()
        scores = scores.masked_fill(padding, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(batch, self.hidden)

    @staticmethod
    def _bucket(batch: int) -> int:
        return next(b for b in BUCKETS if b >= batch) if batch <= BUCKETS[-1] else batch

    def _graph(self, size: int):
        if size not in self._graphs:
            # Capture on a side stream after a warm-up run there (the caching allocator and
            # cuBLAS set themselves up outside the capture). Padding rows use the spare slot.
            self._inputs[1, :].fill_(self.max_batch)
            self._inputs[2:, :].zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode_forward(self._inputs, size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._decode_forward(self._inputs, size)
                greedy = logits.argmax(dim=-1)
            self._graphs[size] = (graph, logits, greedy)
        return self._graphs[size]

    def _decode(self, running: List[_Sequence]) -> torch.Tensor:
        batch = len(running)
        size = self._bucket(batch) if self.use_graphs else batch
        staging = self._staging_np
        staging[:, :size] = 0
        staging[1, :size] = self.max_batch
        for row, s in enumerate(running):
            staging[0, row] = s.token
            staging[1, row] = s.slot
            staging[2, row] = s.length
            generated = s.length >= s.context
            staging[3, row] = s.mask_position if generated else s.length
            staging[4, row] = s.length - s.context + 1 if generated else 0
        if self.use_graphs:
            graph, logits, greedy = self._graph(size)  # before the copy: a first capture clobbers the inputs
            self._inputs[:, :size].copy_(self._staging[:, :size], non_blocking=True)
            graph.replay()
            self._greedy = greedy[:batch]
            self.last_logits = logits[:batch]
        else:
            self._inputs[:, :size].copy_(self._staging[:, :size], non_blocking=True)
            self._greedy = None
            self.last_logits = self._decode_forward(self._inputs, batch)
        return self.last_logits

    def _pick(self, logits: torch.Tensor, sequences: List[_Sequence]) -> List[int]:
        greedy = getattr(self, "_greedy", None)
        if greedy is None or greedy.shape[0] != logits.shape[0]:
            greedy = logits.argmax(dim=-1)
        self._greedy = None
        picked = greedy.tolist()
        for row, sequence in enumerate(sequences):
            if sequence.temperature > 0:
                picked[row] = sample_top_p(logits[row].float(), sequence.temperature, sequence.top_p, sequence.generator)
        return picked


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token from softmax(logits / temperature) cut to the smallest prefix of the sorted
    probabilities whose mass reaches top_p (the most likely token always stays)."""
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice].item())


def build_prompt(query: str, history: Optional[List[Tuple[str, str]]] = None) -> str:
    """The text upstream's chat() gives the tokenizer: the bare query, or numbered rounds."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{old}\n答：{answer}\n" for i, (old, answer) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："
