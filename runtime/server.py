"""The chat server of a deployed host: ChatGLM-6B behind an HTTP API.

    python -m runtime.server --config /etc/chatglm/server.toml          # serve
    python -m runtime.server --config /etc/chatglm/server.toml --check  # validate the settings only

Endpoints: POST /v1/chat/completions (OpenAI's chat format, optionally streamed as server-sent
events), GET /v1/models, POST / (the request and answer shape of upstream's api.py, so existing
clients keep working) and GET /health (200 only once the model is loaded and has produced a token).

How it runs: the event loop only parses, validates and streams; the model lives on one worker
thread that takes jobs from a bounded queue and advances every admitted job by one token per step,
so a client that hangs up is noticed between two tokens. What a step does is up to the backend:
`EngineBackend` batches all admitted jobs through runtime.engine (jobs join between steps),
`StreamChatBackend` runs the model's own stream_chat for one job at a time (the reference path,
and what serves when the engine is not available).
"""

import argparse
import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import math
import os
import platform
import resource
import sys
import threading
import time
import tomllib
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Literal, Optional, Union

import anyio
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("chatglm.server")

# --- settings ------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting that stops the server from starting; the message names the setting and the fix."""


@dataclass(frozen=True)
class Settings:
    model_dir: str
    variant: str = "int4"
    device: str = "cpu"                 # "cpu" or "cuda"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: str = ""              # one line: the key clients send as "Authorization: Bearer <key>"
    queue_size: int = 32                # requests waiting for the worker; one more answers 429
    max_batch: int = 8                  # jobs generating at once (the engine backend; stream_chat runs 1)
    max_prompt_tokens: int = 1536       # the whole conversation, tokenized, special tokens included
    max_tokens: int = 512               # cap on the new tokens of one answer
    model_commit: str = ""              # reported by /health
    model_name: str = "chatglm-6b"      # the id /v1/models lists and answers carry
    backend: str = "auto"               # auto (engine when it loads, else stream_chat), engine, stream_chat
    drain_timeout_s: float = 30.0       # on SIGTERM: how long in-flight requests may still run
    threads: int = 0                    # torch's CPU threads; 0: torch's default (one per core)
    api_key: str = field(default="", repr=False)  # read from api_key_file, never printed

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name may resolve to anything: treat it as exposed


_CHOICES = {"device": ("cpu", "cuda"), "backend": ("auto", "engine", "stream_chat"),
            "variant": ("fp16", "int8", "int4")}
_POSITIVE = ("queue_size", "max_batch", "max_prompt_tokens", "max_tokens")


def load_settings(path: str) -> Settings:
    """Settings from a TOML file; every problem is a ConfigError naming the setting and the fix."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return settings_from_dict(data, source=path)


def settings_from_dict(data: dict, source: str = "config") -> Settings:
    known = {f.name: f for f in fields(Settings) if f.name != "api_key"}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
    if "model_dir" not in data:
        raise ConfigError(f"{source}: setting 'model_dir' is missing; set it to the model checkout's path")
    values = {}
    for name, value in data.items():
        kind = known[name].type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            kind_name = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise ConfigError(f"{source}: setting {name!r} must be {kind_name}, not {value!r}")
        values[name] = value
    for name, choices in _CHOICES.items():
        if name in values and values[name] not in choices:
            raise ConfigError(f"{source}: setting {name!r} is {values[name]!r}; use one of {', '.join(choices)}")
    for name in _POSITIVE:
        if name in values and values[name] < 1:
            raise ConfigError(f"{source}: setting {name!r} must be at least 1, not {values[name]}")
    if not 0 <= values.get("port", 8000) <= 65535:
        raise ConfigError(f"{source}: setting 'port' must be 0-65535, not {values['port']}")
    if values.get("threads", 0) < 0:
        raise ConfigError(f"{source}: setting 'threads' must be 0 (torch's default) or more")
    if values.get("drain_timeout_s", 30.0) < 0:
        raise ConfigError(f"{source}: setting 'drain_timeout_s' must not be negative")
    settings = Settings(**values)
    key = ""
    if settings.api_key_file:
        try:
            with open(settings.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{source}: setting 'api_key_file': cannot read {settings.api_key_file}: "
                              f"{exc.strerror}") from None
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"{source}: setting 'api_key_file': {settings.api_key_file} must hold one key, "
                              "one line without spaces")
    if not settings.loopback and not key:
        raise ConfigError(f"{source}: setting 'host' is {settings.host!r}, reachable from other machines, and no "
                          "API key is set; set 'api_key_file' to a file holding the key, or listen on 127.0.0.1")
    return Settings(**values, api_key=key)


# --- conversations ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server will not run: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def build_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM-6B's chat layout: earlier turns as numbered rounds of question and answer, the new
    question last with its answer left open; a first question goes in bare."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise RequestError(400, f"messages[{index}].content: only text parts are supported, not {part.type!r}",
                               param=f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def turns_from_messages(messages) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) for the model from OpenAI-style messages.

    System messages have no place in ChatGLM-6B's prompt, so their text goes before the first
    user message. Consecutive messages of one role are joined with a newline, so a user who sent
    two messages in a row is one question. The conversation must end with a user message: that
    is the question the model answers."""
    system, turns = [], []  # turns: [role, text] with roles alternating
    for index, message in enumerate(messages):
        text = _content_text(message.content, index)
        if message.role == "system":
            if turns:
                raise RequestError(400, f"messages[{index}]: a system message must come before the conversation",
                                   param=f"messages[{index}].role")
            system.append(text)
        elif message.role == "assistant" and not turns:
            raise RequestError(400, f"messages[{index}]: an assistant message needs a user message before it",
                               param=f"messages[{index}].role")
        elif turns and turns[-1][0] == message.role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([message.role, text])
    if not turns or turns[-1][0] != "user":
        raise RequestError(400, "the last message must have the role 'user': it is the question to answer",
                           param="messages")
    if system:
        turns[0][1] = "\n".join(system + [turns[0][1]])
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return turns[-1][1], history


def text_delta(sent: str, text: str) -> str:
    """The part of `text` (everything decoded so far) that the client has not been sent yet.

    A character split over several tokens decodes as U+FFFD until its last byte arrives, so a
    trailing U+FFFD is held back. If decoding changed text that was already sent (it can, at a
    token boundary), nothing more is sent until the text agrees with what the client has again."""
    text = text.rstrip("\ufffd")
    return text[len(sent):] if text.startswith(sent) else ""


class Detokenizer:
    """The text of a growing answer, one token at a time, decoding only the last few tokens:
    decoding the whole answer after every token would cost time growing with its length.

    Two decodes of one window that starts at `prefix` (the tokens up to `read` already sent,
    and those plus the new ones) give the new text as their difference; a window's own first
    token decodes the same way in both, whatever the tokenizer does at a window's start. The
    window moves up once the text is whole (no partial character at its end)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or not text.startswith(sent):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent):]


# --- jobs and the worker ------------------------------------------------------------------------


class Job:
    """One generation, shared by the request's handler (event loop) and the worker thread."""

    def __init__(self, query: str, history: list, prompt_ids: list[int], max_new_tokens: int,
                 temperature: float, top_p: float, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.id = uuid.uuid4().hex
        self.query, self.history, self.prompt_ids = query, history, prompt_ids
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False      # set by the event loop; the worker reads it between tokens
        self.done = False           # the worker has sent the last event
        self.sent = ""              # text handed to the client so far (worker thread only)
        self.completion_tokens = 0
        self.submitted = time.monotonic()
        self.started: Optional[float] = None
        self.first_token_at: Optional[float] = None

    def deliver(self, delta: str, finish: Optional[str] = None, error: Optional[str] = None) -> None:
        """From the worker: text for the client, and with the last event why it ended."""
        deliver_all([(self, delta, finish, error)])

    async def stream(self):
        """(text, finish_reason, error) as they come, until the last one. Text that piled up
        while this request's sends were slow comes as one piece: fewer, larger writes."""
        while True:
            delta, finish, error = await self.events.get()
            while not (finish or error) and not self.events.empty():
                more, finish, error = self.events.get_nowait()
                delta += more
            yield delta, finish, error
            if finish or error:
                return


def deliver_all(events) -> None:
    """From the worker: (job, text, finish, error) of a whole step, handed to each event loop in
    one call (one wake-up of the loop per step, not one per job)."""
    by_loop = {}
    for job, delta, finish, error in events:
        if finish or error:
            job.done = True
        by_loop.setdefault(job.loop, []).append((job, delta, finish, error))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass


def _put_all(items) -> None:
    for job, delta, finish, error in items:
        job.events.put_nowait((delta, finish, error))


class Backend:
    """What the worker needs from a way of generating: admit a job, advance every admitted job by
    one token, drop a job. Methods are called from the worker thread only."""

    capacity = 1

    def start(self, job: Job) -> None:
        raise NotImplementedError

    def step(self) -> list[tuple[Job, str, Optional[str]]]:
        """One token for each admitted job: (job, new text, finish reason or None if it goes on)."""
        raise NotImplementedError

    def cancel(self, job: Job) -> None:
        raise NotImplementedError


class StreamChatBackend(Backend):
    """The model's own stream_chat, one job at a time: the reference path every ChatGLM-6B
    checkout has. Each step pulls one token out of the running generator."""

    capacity = 1

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.job: Optional[Job] = None
        self.generator = None

    def start(self, job: Job) -> None:
        sample = job.temperature > 0
        options = {"do_sample": sample, "top_p": job.top_p, "max_new_tokens": job.max_new_tokens}
        if sample:
            options["temperature"] = job.temperature
        self.job = job
        self.generator = self.model.stream_chat(self.tokenizer, job.query, job.history,
                                                max_length=self.max_length, **options)

    def step(self):
        job = self.job
        try:
            text, _ = next(self.generator)
        except StopIteration:
            self._drop()
            return [(job, "", "stop")]
        job.completion_tokens += 1
        delta = text_delta(job.sent, text)
        job.sent += delta
        if job.completion_tokens >= job.max_new_tokens:
            self._drop()
            return [(job, delta, "length")]
        return [(job, delta, None)]

    def cancel(self, job: Job) -> None:
        if self.job is job:
            self._drop()

    def _drop(self):
        if self.generator is not None:
            self.generator.close()
        self.job = self.generator = None


class EngineBackend(Backend):
    """Continuous batching through runtime.engine: every admitted job owns a slot of the engine's
    batch, a step decodes one token for all of them, and new jobs take free slots between steps."""

    def __init__(self, engine, tokenizer, capacity: int):
        self.engine, self.tokenizer, self.capacity = engine, tokenizer, capacity
        self.slots: dict = {}       # slot -> job
        self.texts: dict = {}       # job id -> its Detokenizer
        # Either ends an answer, as in the model's own chat(); the engine stops on them and
        # reports the stop token, which is not part of the answer.
        self.stop_ids = {tokenizer.eos_token_id, getattr(tokenizer, "end_token_id", None)} - {None}

    def start(self, job: Job) -> None:
        slot = self.engine.add(job.prompt_ids, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                               top_p=job.top_p, stop_ids=sorted(self.stop_ids))
        self.slots[slot] = job
        self.texts[job.id] = Detokenizer(self.tokenizer)

    def step(self):
        results = []
        for slot, token_id, finished in self.engine.step():
            job = self.slots.get(slot)
            if job is None:
                continue
            delta = ""
            if token_id is not None and token_id not in self.stop_ids:
                job.completion_tokens += 1
                delta = self.texts[job.id].add(token_id)
                job.sent += delta
            finish = None
            if finished:
                finish = "length" if job.completion_tokens >= job.max_new_tokens else "stop"
                self._forget(slot)
            results.append((job, delta, finish))
        return results

    def cancel(self, job: Job) -> None:
        for slot, owner in list(self.slots.items()):
            if owner is job:
                self.engine.cancel(slot)
                self._forget(slot)

    def _forget(self, slot):
        job = self.slots.pop(slot)
        self.texts.pop(job.id, None)


class QueueFull(Exception):
    pass


class Scheduler:
    """The bounded queue and the worker loop that feeds the backend from it."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.cond = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.running: list[Job] = []
        self.stopping = False
        self.job_seconds = 1.0      # running mean of a job's time in the backend (for Retry-After)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull()
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """From the event loop: stop this job; a waiting job leaves the queue at once, a running one
        is dropped by the worker before its next token."""
        if job.done or job.cancelled:
            return
        job.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.deliver("", "cancelled")
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def run(self, backend: Backend) -> None:
        """The worker loop: admit, drop the cancelled, step; until stop()."""
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running:
                    self.cond.wait()
                if self.stopping:
                    break
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < backend.capacity:
                    admitted.append(self.waiting.popleft())
            for job in admitted:
                try:
                    backend.start(job)
                except Exception as exc:  # one bad job must not take the worker down
                    log.exception("could not start job %s", job.id)
                    job.deliver("", error=f"{type(exc).__name__}: {exc}")
                    continue
                job.started = time.monotonic()
                self.running.append(job)
            for job in [j for j in self.running if j.cancelled]:
                backend.cancel(job)
                self.running.remove(job)
                job.deliver("", "cancelled")
                log.info("job %s cancelled after %d tokens", job.id, job.completion_tokens)
            if not self.running:
                continue
            try:
                events = backend.step()
            except Exception as exc:  # fail what was running, keep serving
                log.exception("generation step failed")
                for job in self.running:
                    try:
                        backend.cancel(job)
                    except Exception:
                        pass
                    job.deliver("", error=f"{type(exc).__name__}: {exc}")
                self.running.clear()
                continue
            now = time.monotonic()
            for job, delta, finish in events:
                if job.first_token_at is None:
                    job.first_token_at = now
                if finish:
                    # Out of `running` before the client can see the end, so /health never
                    # counts an answered request as generating.
                    self.running.remove(job)
                    self.job_seconds += (now - job.started - self.job_seconds) / 8
            deliver_all([(job, delta, finish, None) for job, delta, finish in events])
        # Whatever is left when the worker stops ends now, so no handler waits for ever.
        with self.cond:
            leftover, self.waiting = list(self.waiting) + self.running, collections.deque()
            self.running = []
        for job in leftover:
            try:
                backend.cancel(job)
            except Exception:
                pass
            job.deliver("", "cancelled")

    def retry_after(self, capacity: int) -> int:
        """Seconds until a place in the queue is likely free."""
        return max(1, math.ceil(self.job_seconds * (self.queued + 1) / max(capacity, 1)))


# --- the model service --------------------------------------------------------------------------


def load_model(settings: Settings):
    """(model, tokenizer) from the model checkout, on the configured device."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if settings.threads:
        # On a CPU shared with other work, torch's one thread per core can spend more time
        # waiting at its own barriers than computing.
        torch.set_num_threads(settings.threads)
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(settings.model_dir, trust_remote_code=True)
    model = (model.half().cuda() if settings.device == "cuda" else model.float()).eval()
    torch.set_grad_enabled(False)  # grad mode is per thread: this is the worker's
    return model, tokenizer


def runtime_versions(device: str) -> dict:
    """The software the model runs on (and the GPU), as /health reports it."""
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
    return found


def make_backend(settings: Settings, model, tokenizer) -> Backend:
    max_length = settings.max_prompt_tokens + settings.max_tokens
    if settings.backend in ("auto", "engine"):
        try:
            from runtime.engine import Engine

            engine = Engine(model, tokenizer, settings.device, settings.max_batch, max_length)
            if engine.dense_bytes:
                log.info("%s weights dequantized once for the CPU: %.2f GB", settings.variant, engine.dense_bytes / 1e9)
            # On a GPU: capture the decode step of every batch size now, before /health says
            # ready, rather than during the first requests of each size.
            engine.warmup()
            return EngineBackend(engine, tokenizer, settings.max_batch)
        except Exception as exc:
            if settings.backend == "engine":
                raise
            log.warning("batching engine not available (%s: %s); serving one request at a time "
                        "through the model's stream_chat", type(exc).__name__, exc)
    return StreamChatBackend(model, tokenizer, max_length)


INLINE_TOKENIZE_CHARS = 1000


class Service:
    """The model, its worker thread and what /health reports."""

    def __init__(self, settings: Settings, loader=load_model, backend_factory=make_backend):
        self.settings = settings
        self.loader, self.backend_factory = loader, backend_factory
        self.scheduler = Scheduler(settings.queue_size)
        self.state = "loading"      # loading -> ready; failed; draining once SIGTERM came
        self.error = ""
        self.tokenizer = None
        self.backend: Optional[Backend] = None
        self.started = time.monotonic()
        self.ready_after_s: Optional[float] = None
        self.thread: Optional[threading.Thread] = None
        self.on_fatal = lambda: None
        self.versions: dict = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.thread = threading.Thread(target=self._work, args=(loop,), name="chatglm-worker", daemon=True)
        self.thread.start()

    def _work(self, loop) -> None:
        try:
            model, tokenizer = self.loader(self.settings)
            self.versions = runtime_versions(self.settings.device)
            backend = self.backend_factory(self.settings, model, tokenizer)
            self.tokenizer, self.backend = tokenizer, backend
            self._warm_up(backend, tokenizer, loop)
        except Exception as exc:
            log.exception("the model did not load")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self.on_fatal()
            return
        self.ready_after_s = round(time.monotonic() - self.started, 3)
        if self.state == "loading":
            self.state = "ready"
        log.info("ready after %.1f s (%s backend, %s, %s)", self.ready_after_s, type(backend).__name__,
                 self.settings.variant, self.settings.device)
        self.scheduler.run(backend)

    def _warm_up(self, backend: Backend, tokenizer, loop) -> None:
        """Generate one token before saying ready: a model that loads but cannot run (a kernel
        missing for this GPU, say) must not be reported healthy."""
        query = "你好"
        job = Job(query, [], tokenizer(build_prompt(query, []))["input_ids"], 1, 0.0, 1.0, loop)
        backend.start(job)
        finish = None
        while finish is None:
            finish = next((f for j, _, f in backend.step() if j is job), None)
        if job.completion_tokens < 1:
            raise RuntimeError("the model produced no token in its warm-up")

    def stop(self, timeout: float = 10.0) -> None:
        self.scheduler.stop()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def capacity(self) -> int:
        return self.backend.capacity if self.backend else 1

    def health(self) -> dict:
        return {"status": self.state, "variant": self.settings.variant, "device": self.settings.device,
                "model": self.settings.model_name, "model_commit": self.settings.model_commit,
                "backend": type(self.backend).__name__ if self.backend else None,
                "queue": self.scheduler.queued, "active": self.scheduler.active,
                "queue_size": self.settings.queue_size, "uptime_s": round(time.monotonic() - self.started, 3),
                "ready_after_s": self.ready_after_s, "versions": self.versions,
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
                "peak_vram_gb": self.peak_vram_gb(), **({"error": self.error} if self.error else {})}

    def peak_vram_gb(self) -> Optional[float]:
        """The most GPU memory torch has held for this process, None on CPU."""
        torch = sys.modules.get("torch")
        if self.settings.device != "cuda" or torch is None or not torch.cuda.is_initialized():
            return None
        return round(torch.cuda.max_memory_allocated() / 1e9, 3)

    def check_ready(self) -> None:
        if self.state != "ready":
            reason = {"loading": "the model is still loading", "draining": "the server is shutting down",
                      "failed": "the model failed to load"}[self.state]
            raise RequestError(503, reason, code=self.state, headers={"Retry-After": "5"})

    def prompt_ids(self, query: str, history: list) -> list[int]:
        """The tokenized prompt, refused when it is over max_prompt_tokens."""
        limit = self.settings.max_prompt_tokens
        prompt = build_prompt(query, history)
        # No token of ChatGLM-6B's vocabulary stands for more than 80 characters (its longest
        # pieces are runs of spaces), so text this long is over the limit without tokenizing it.
        if len(prompt) > limit * 100:
            raise RequestError(400, f"the prompt is {len(prompt)} characters, far over this server's limit of "
                               f"{limit} tokens (max_prompt_tokens)", code="prompt_too_long")
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > limit:
            raise RequestError(400, f"the prompt is {len(ids)} tokens, over this server's limit of {limit} "
                               "(max_prompt_tokens); shorten the conversation", code="prompt_too_long")
        return ids

    async def tokenize(self, query: str, history: list) -> list[int]:
        self.check_ready()
        # Tokenizing grows with the input: a long conversation goes off the event loop; a short
        # one (well under a millisecond) costs less than the hop to a thread and back.
        if len(query) + sum(len(q) + len(a) for q, a in history) <= INLINE_TOKENIZE_CHARS:
            return self.prompt_ids(query, history)
        return await anyio.to_thread.run_sync(self.prompt_ids, query, history)

    def enqueue(self, query: str, history: list, ids: list[int], max_new_tokens: int, temperature: float,
                top_p: float) -> Job:
        # Refused once draining began: a request that was still being read when SIGTERM came
        # was not in flight yet.
        self.check_ready()
        job = Job(query, history, ids, max_new_tokens, temperature, top_p, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise RequestError(429, f"the server is busy: {self.settings.queue_size} requests are waiting "
                               "(queue_size); retry later", code="queue_full",
                               headers={"Retry-After": str(self.scheduler.retry_after(self.capacity))}) from None
        return job


# --- HTTP ---------------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: str
    text: str = ""


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: Optional[str] = None     # any name is accepted: this server has one model
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # newer clients' name for max_tokens
    temperature: float = Field(0.95, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(0.7, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    stop: Union[None, str, list[str]] = None


class PlainRequest(BaseModel):
    """Upstream api.py's request."""
    model_config = ConfigDict(extra="ignore")
    prompt: str
    history: list[tuple[str, str]] = []
    max_length: Optional[int] = Field(None, ge=1)
    top_p: float = Field(0.7, gt=0, le=1, allow_inf_nan=False)
    temperature: float = Field(0.95, ge=0, le=2, allow_inf_nan=False)


def error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _location(loc) -> str:
    out = ""
    for part in map(str, loc):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


MAX_BODY_BYTES = 8 << 20


async def parse_body(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`: 400 when it is not JSON (whatever its content type
    says: old clients send JSON without one), 422 naming the first bad field, 413 when huge."""
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        where = _location(errors[0]["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RequestError(422, f"{where}: {errors[0]['msg']}{more}", param=where) from None


def _sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class JobResponse(Response):
    """Sends a job's answer, streamed or whole, and cancels the job when the client hangs up (or
    when the request is cancelled, as at the end of a drain)."""

    def __init__(self, scheduler: Scheduler, job: Job, produce):
        super().__init__()
        self.scheduler, self.job, self.produce = scheduler, job, produce

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def watch():
                # The body was read already; the next message is the disconnect.
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.scheduler.cancel(self.job)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.produce(send)
            finally:
                self.scheduler.cancel(self.job)
                group.cancel_scope.cancel()


async def _start(send, status: int, content_type: bytes, extra=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), *extra]})


async def _send_json(send, status: int, body: dict) -> None:
    await _start(send, status, b"application/json")
    await send({"type": "http.response.body", "body": json.dumps(body, ensure_ascii=False).encode()})


class BearerAuth:
    """Every path but /health needs the key when one is set (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                                  code="invalid_api_key")
                await _start(send, 401, b"application/json", [(b"www-authenticate", b"Bearer")])
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
                return
        await self.app(scope, receive, send)


def create_app(service: Service) -> Starlette:
    """Starlette's routing and error handling, no more: bodies are parsed and validated here
    (parse_body), responses streamed by JobResponse; a lighter stack is less work per request."""
    settings = service.settings

    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        service.start(asyncio.get_running_loop())
        yield
        await anyio.to_thread.run_sync(service.stop)

    async def request_error(request, exc: RequestError):
        return JSONResponse(error_body(exc.message, exc.status, exc.param, exc.code), exc.status,
                            headers=exc.headers)

    async def unexpected(request, exc: Exception):
        # Logged with its traceback here; the client learns only that it failed.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal error; see the server's log", 500), 500)

    async def http_error(request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, exc.status_code), exc.status_code, headers=exc.headers)

    async def health(request):
        body = service.health()
        return JSONResponse(body, 200 if body["status"] == "ready" else 503)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                         "created": created, "owned_by": "chatglm-deploy"}]})

    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        if body.stop:
            raise RequestError(400, "'stop' is not supported by this server", param="stop")
        query, history = turns_from_messages(body.messages)
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > settings.max_tokens:
            raise RequestError(400, f"max_tokens is {wanted}, over this server's limit of {settings.max_tokens} "
                               "(max_tokens)", param="max_tokens", code="max_tokens_too_large")
        ids = await service.tokenize(query, history)
        job = service.enqueue(query, history, ids, wanted or settings.max_tokens, body.temperature, body.top_p)
        reply = {"id": f"chatcmpl-{job.id}", "created": int(time.time()), "model": settings.model_name}

        def usage():
            prompt = len(job.prompt_ids)
            return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
                    "total_tokens": prompt + job.completion_tokens}

        async def stream(send):
            await _start(send, 200, b"text/event-stream; charset=utf-8",
                         [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")])
            chunk = {**reply, "object": "chat.completion.chunk"}

            async def event(delta, finish=None):
                await send({"type": "http.response.body", "more_body": True, "body": _sse(
                    {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})})

            await event({"role": "assistant", "content": ""})
            async for delta, finish, error in job.stream():
                if error:
                    await send({"type": "http.response.body", "body": _sse(error_body(error, 500))})
                    return
                if delta:
                    await event({"content": delta})
                if finish:
                    await event({}, finish)
            if body.stream_options and body.stream_options.include_usage:
                await send({"type": "http.response.body", "more_body": True,
                            "body": _sse({**chunk, "choices": [], "usage": usage()})})
            await send({"type": "http.response.body", "body": _sse("[DONE]")})

        async def whole(send):
            text, finish, error = "", None, None
            async for delta, finish, error in job.stream():
                text += delta
            if error:
                await _send_json(send, 500, error_body(f"generation failed: {error}", 500))
                return
            await _send_json(send, 200, {
                **reply, "object": "chat.completion", "usage": usage(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}]})

        return JobResponse(service.scheduler, job, stream if body.stream else whole)

    async def plain_chat(request: Request):
        body = await parse_body(request, PlainRequest)
        history = [tuple(turn) for turn in body.history]
        # max_length counts prompt and answer together (upstream's meaning); the answer still
        # stays within this server's max_tokens, so old clients sending 2048 keep working.
        ids = await service.tokenize(body.prompt, history)
        budget = settings.max_tokens
        if body.max_length is not None:
            if body.max_length <= len(ids):
                raise RequestError(400, f"max_length is {body.max_length} but the prompt alone is {len(ids)} "
                                   "tokens", param="max_length")
            budget = min(budget, body.max_length - len(ids))
        job = service.enqueue(body.prompt, history, ids, budget, body.temperature, body.top_p)

        async def whole(send):
            text, error = "", None
            async for delta, _, error in job.stream():
                text += delta
            if error:
                await _send_json(send, 500, {"response": "", "history": body.history, "status": 500,
                                             "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                                             "error": error})
                return
            log.info("POST / answered %d tokens", job.completion_tokens)
            await _send_json(send, 200, {"response": text, "history": [*map(list, history), [body.prompt, text]],
                                         "status": 200, "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")})

        return JobResponse(service.scheduler, job, whole)

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/", plain_chat, methods=["POST"])]
    handlers = {RequestError: request_error, HTTPException: http_error, Exception: unexpected}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


class Server(uvicorn.Server):
    """uvicorn's server, marking the service as draining as soon as SIGTERM/SIGINT arrives so
    /health turns 503 and requests on open connections are refused while in-flight ones finish."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        service.on_fatal = self.fail

    def handle_exit(self, sig, frame) -> None:
        if self.service.state in ("loading", "ready"):
            self.service.state = "draining"
            log.info("draining: %d queued, %d generating; up to %.0f s", self.service.scheduler.queued,
                     self.service.scheduler.active, self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)

    def fail(self) -> None:
        self.should_exit = True


def build_server(service: Service, **config) -> Server:
    settings = service.settings
    app = BearerAuth(create_app(service), settings.api_key)
    # h11 and asyncio, not "auto": the disconnect watch relies on h11's receive() answering
    # http.disconnect once the client has gone, and the choice should not depend on what
    # else happens to be installed.
    options = dict(host=settings.host, port=settings.port, http="h11", loop="asyncio", lifespan="on",
                   timeout_graceful_shutdown=settings.drain_timeout_s, server_header=False,
                   proxy_headers=False, log_config=None)
    options.update(config)
    return Server(uvicorn.Config(app, **options), service)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the server's TOML settings file")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"chatglm server: {exc}", file=sys.stderr)
        return 2
    if args.check:
        # What only the host can tell: the model checkout is there.
        if not os.path.isfile(os.path.join(settings.model_dir, "config.json")):
            print(f"chatglm server: setting 'model_dir': {settings.model_dir} holds no model (no config.json)",
                  file=sys.stderr)
            return 2
        print(f"{args.config}: OK ({settings.host}:{settings.port}, "
              f"{'API key set' if settings.api_key else 'no API key'})")
        return 0
    service = Service(settings)
    server = build_server(service)
    log.info("listening on %s:%d (%s); loading %s from %s", settings.host, settings.port,
             "API key required" if settings.api_key else "no API key", settings.variant, settings.model_dir)
    server.run()
    if service.state == "failed":
        print(f"chatglm server: the model did not load: {service.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
