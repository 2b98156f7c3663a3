"""The chat server (runtime/server.py): request handling as units, then real HTTP on 127.0.0.1
against the int4 fixture model on CPU, in this process (uvicorn on a thread, with a gate on the
worker's steps so queue and cancellation states can be held still) and as `python -m
runtime.server` in a subprocess (signals, exit codes, logs)."""
import asyncio
import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# The int4 kernel compiles into transformers' modules cache: keep it out of ~/.cache (as
# test_fixtures does) and share it with the subprocess servers.
if "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="server-hf-modules-")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

pytest.importorskip("torch")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from runtime import server  # noqa: E402
from runtime.server import (Backend, ConfigError, Detokenizer, Job, QueueFull, RequestError,  # noqa: E402
                            Scheduler, build_prompt, settings_from_dict, text_delta, turns_from_messages)

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-5f1c0a9e"


# --- units: prompts, messages, text, settings -----------------------------------------------------

def messages(*pairs):
    return [server.Message(role=role, content=content) for role, content in pairs]


def test_build_prompt_matches_the_model_layout():
    from lab.fixtures.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration as Model

    for query, history in [("你好！", []), ("q2", [("q0", "r0"), ("q1", "r1")]), ("x", [("", "")])]:
        assert build_prompt(query, history) == Model.build_prompt(query, history)


def test_turns_from_messages():
    assert turns_from_messages(messages(("user", "hi"))) == ("hi", [])
    query, history = turns_from_messages(messages(
        ("system", "be brief"), ("user", "q0"), ("assistant", "a0"), ("user", "q1"), ("user", "more"),
        ("assistant", "a1"), ("assistant", "a1b"), ("user", "q2")))
    assert query == "q2"
    assert history == [("be brief\nq0", "a0"), ("q1\nmore", "a1\na1b")]
    parts = [server.Message(role="user", content=[server.TextPart(type="text", text="a"),
                                                   server.TextPart(type="text", text="b")])]
    assert turns_from_messages(parts) == ("ab", [])


@pytest.mark.parametrize("conversation, wanted", [
    ([("user", "q"), ("assistant", "a")], "last message must have the role 'user'"),
    ([("assistant", "a"), ("user", "q")], "needs a user message before it"),
    ([("user", "q"), ("system", "s"), ("user", "q")], "system message must come before"),
    ([("system", "only")], "last message must have the role 'user'"),
])
def test_turns_from_messages_refuses(conversation, wanted):
    with pytest.raises(RequestError, match=wanted) as caught:
        turns_from_messages(messages(*conversation))
    assert caught.value.status == 400


def test_turns_from_messages_refuses_images():
    image = [server.Message(role="user", content=[server.TextPart(type="image_url")])]
    with pytest.raises(RequestError, match=r"messages\[0\].content: only text parts"):
        turns_from_messages(image)


def test_text_delta():
    assert text_delta("", "你") == "你"
    assert text_delta("你", "你好") == "好"
    assert text_delta("你", "你\ufffd") == ""          # half a character: wait for the rest
    assert text_delta("你", "你好\ufffd") == "好"
    assert text_delta("abc", "abd") == ""              # decoding changed sent text: send nothing
    assert text_delta("", "") == ""


class ByteTokenizer:
    """Token ids are UTF-8 bytes: a character comes whole only with its last byte."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_sends_whole_characters_in_order():
    text = "Hello, 你好！ café ☕ done"
    detokenizer = Detokenizer(ByteTokenizer())
    pieces = [detokenizer.add(byte) for byte in text.encode()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[:3] == ["H", "e", "l"] and pieces[7:10] == ["", "", "你"]
    assert len(detokenizer.ids) - detokenizer.prefix <= 4  # the window stays short


def test_settings(tmp_path):
    s = settings_from_dict({"model_dir": "/m"})
    assert (s.host, s.port, s.api_key, s.backend, s.loopback) == ("127.0.0.1", 8000, "", "auto", True)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    exposed = settings_from_dict({"model_dir": "/m", "host": "0.0.0.0", "api_key_file": str(key_file),
                                  "drain_timeout_s": 5})
    assert exposed.api_key == KEY and exposed.drain_timeout_s == 5.0
    assert KEY not in repr(exposed)
    assert settings_from_dict({"model_dir": "/m", "host": "::1"}).loopback
    assert settings_from_dict({"model_dir": "/m", "host": "localhost"}).loopback


@pytest.mark.parametrize("data, wanted", [
    ({}, "'model_dir' is missing"),
    ({"model_dir": "/m", "prot": 1}, "unknown setting 'prot'"),
    ({"model_dir": "/m", "port": "80"}, "'port' must be an integer, not '80'"),
    ({"model_dir": "/m", "queue_size": 0}, "'queue_size' must be at least 1"),
    ({"model_dir": "/m", "device": "tpu"}, "'device' is 'tpu'; use one of cpu, cuda"),
    ({"model_dir": "/m", "threads": -1}, "'threads' must be 0"),
    ({"model_dir": "/m", "host": "0.0.0.0"}, "'host' is '0.0.0.0', reachable from other machines, and no API key"),
    ({"model_dir": "/m", "host": "myhost"}, "no API key"),
    ({"model_dir": "/m", "api_key_file": "/nonexistent/key"}, "cannot read /nonexistent/key"),
])
def test_settings_refused(data, wanted):
    with pytest.raises(ConfigError, match=wanted.replace("(", r"\(").replace(")", r"\)")):
        settings_from_dict(data)


def test_empty_key_file_refused(tmp_path):
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="must hold one key"):
        settings_from_dict({"model_dir": "/m", "host": "10.0.0.1", "api_key_file": str(tmp_path / "key")})


# --- units: the scheduler with a scripted backend -------------------------------------------------

class Scripted(Backend):
    """Each job yields `len(job.query)` one-character tokens; optionally fails at a chosen token."""

    def __init__(self, capacity=2, fail_on=None):
        self.capacity, self.fail_on, self.jobs, self.steps = capacity, fail_on, [], 0

    def start(self, job):
        self.jobs.append(job)

    def step(self):
        self.steps += 1
        out = []
        for job in list(self.jobs):
            if job.query[job.completion_tokens] == self.fail_on:
                raise RuntimeError("boom")
            job.completion_tokens += 1
            done = job.completion_tokens == len(job.query)
            if done:
                self.jobs.remove(job)
            out.append((job, job.query[job.completion_tokens - 1], "stop" if done else None))
        return out

    def cancel(self, job):
        if job in self.jobs:
            self.jobs.remove(job)


async def collect(job):
    text, last = "", None
    async for delta, finish, error in job.stream():
        text += delta
        last = finish or f"error: {error}"
    return text, last


def test_scheduler_batches_queues_and_cancels():
    async def main():
        loop = asyncio.get_running_loop()
        scheduler, backend = Scheduler(queue_size=4), Scripted(capacity=2)
        jobs = [Job(q, [], [], 99, 0.0, 1.0, loop) for q in ("abc", "defg", "hi", "jk")]
        for job in jobs:
            scheduler.submit(job)
        with pytest.raises(QueueFull):
            scheduler.submit(Job("x", [], [], 9, 0.0, 1.0, loop))
        scheduler.cancel(jobs[3])  # waiting: leaves the queue at once
        assert scheduler.queued == 3
        worker = threading.Thread(target=scheduler.run, args=(backend,))
        worker.start()
        results = await asyncio.gather(*(collect(j) for j in jobs))
        scheduler.stop()
        worker.join(5)
        assert results == [("abc", "stop"), ("defg", "stop"), ("hi", "stop"), ("", "cancelled")]
        # Two at a time, "hi" joining when "abc" is done: 5 steps (one at a time would take 9).
        assert backend.steps == 5

    asyncio.run(main())


def test_scheduler_survives_a_failing_step():
    async def main():
        loop = asyncio.get_running_loop()
        scheduler, backend = Scheduler(queue_size=4), Scripted(capacity=1, fail_on="!")
        worker = threading.Thread(target=scheduler.run, args=(backend,))
        worker.start()
        bad, good = Job("ab!", [], [], 9, 0.0, 1.0, loop), Job("ok", [], [], 9, 0.0, 1.0, loop)
        scheduler.submit(bad)
        scheduler.submit(good)
        assert await collect(bad) == ("ab", "error: RuntimeError: boom")
        assert await collect(good) == ("ok", "stop")
        scheduler.stop()
        worker.join(5)
        assert not worker.is_alive()

    asyncio.run(main())


# --- the real model over HTTP -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lab.fixtures import build

    return build.build_fixtures(tmp_path_factory.mktemp("models"))["int4"]["dir"]


class Gate(Backend):
    """A real backend whose steps wait while the gate is shut, so a test can hold jobs in the
    queue or mid-answer; `steps` counts the steps each job took part in."""

    def __init__(self, inner):
        self.inner, self.capacity = inner, inner.capacity
        self.cond, self.open_, self.steps = threading.Condition(), True, {}
        self.widest = 0             # most jobs one step advanced
        self.fail_next = False      # the next step raises, as a failing model would

    def shut(self):
        with self.cond:
            self.open_ = False

    def open(self):
        with self.cond:
            self.open_ = True
            self.cond.notify_all()

    def start(self, job):
        self.inner.start(job)

    def cancel(self, job):
        self.inner.cancel(job)

    def step(self):
        with self.cond:
            self.cond.wait_for(lambda: self.open_, timeout=60)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model broke")
        events = self.inner.step()
        self.widest = max(self.widest, len(events))
        for job, _, _ in events:
            self.steps[job.id] = self.steps.get(job.id, 0) + 1
        return events


class Running:
    """A server on a thread of this process."""

    def __init__(self, model_dir, loader=server.load_model, **options):
        settings = dict(model_dir=model_dir, port=0, queue_size=2, max_batch=2, max_prompt_tokens=200,
                        max_tokens=64, model_commit="c0ffee", drain_timeout_s=30.0)
        settings.update(options)
        self.settings = server.Settings(**settings)
        self.gate = None

        def backend(settings, model, tokenizer):
            self.gate = Gate(server.make_backend(settings, model, tokenizer))
            return self.gate

        self.service = server.Service(self.settings, loader=loader, backend_factory=backend)
        self.uvicorn = server.build_server(self.service, log_level="warning")
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        sockets = self.uvicorn.servers[0].sockets  # none left if the server already stopped (a failed load)
        self.port = sockets[0].getsockname()[1] if sockets else None

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while self.service.state != "ready":
            assert time.monotonic() < deadline and self.service.state == "loading", self.service.error
            time.sleep(0.05)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)


def request(port, method, path, body=None, key=None, raw=None, timeout=60):
    """(status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return response.status, dict(response.getheaders()), parsed


def open_stream(port, body, key=KEY):
    """A streaming chat request whose response is left unread: (connection, response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_events(response):
    """The data: payloads of a server-sent-event stream, to its end."""
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: "):])
    return events


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module", params=["auto", "stream_chat"])
def keyed(model_dir, tmp_path_factory, request):
    """A server with an API key; "auto" batches through runtime.engine where it is importable,
    "stream_chat" is the one-at-a-time reference path: both must behave the same."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    settings = settings_from_dict({"model_dir": model_dir, "api_key_file": str(key_file)})
    running = Running(model_dir, api_key=settings.api_key, backend=request.param)
    running.wait_ready()
    yield running
    running.gate.open()
    running.stop()


QUESTION = {"messages": [{"role": "user", "content": "你好！"}]}


def test_openai_client_streams_and_answers(keyed):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{keyed.port}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["chatglm-6b"]
    chunks = list(client.chat.completions.create(
        model="chatglm-6b", messages=[{"role": "system", "content": "简短"}, {"role": "user", "content": "你好！"},
                                      {"role": "assistant", "content": "你好！"},
                                      {"role": "user", "content": "请介绍一下你自己。"}],
        stream=True, max_tokens=12, temperature=0, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip() and finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and 1 <= usage.completion_tokens <= 12 and usage.prompt_tokens > 10

    answer = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "你好！"}],
                                            max_tokens=12, temperature=0)
    assert answer.model == "chatglm-6b" and answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    # Greedy decoding is deterministic: the whole answer equals the streamed one of the same question.
    again = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好！"}],
                                                max_tokens=12, temperature=0, stream=True))
    assert answer.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in again)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    with pytest.raises(openai.BadRequestError, match="max_tokens is 100000, over this server's limit of 64"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{keyed.port}/v1", api_key="wrong", max_retries=0).models.list()


def test_detokenizer_with_the_model_tokenizer(keyed):
    tokenizer = keyed.service.tokenizer
    # Rare characters come as byte tokens; spaces, tabs and newlines have pieces of their own.
    text = "你好！Hello  world\n\tprint(x)  " + "".join(chr(0x4E00 + i * 7) for i in range(12)) + " end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer)
    assert "".join(detokenizer.add(i) for i in ids) == tokenizer.decode(ids) == text


def test_upstream_api_format(keyed):
    status, _, body = request(keyed.port, "POST", "/", {"prompt": "请介绍一下你自己。",
                                                          "history": [["你好！", "你好！"]], "temperature": 0.01},
                              key=KEY)
    assert status == 200 and body["status"] == 200 and body["response"]
    assert body["history"] == [["你好！", "你好！"], ["请介绍一下你自己。", body["response"]]]
    assert time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    # max_length counts the prompt too; one more than the prompt leaves one token to answer.
    prompt_tokens = len(keyed.service.prompt_ids("你好！", []))
    status, _, body = request(keyed.port, "POST", "/", {"prompt": "你好！", "max_length": prompt_tokens + 1}, key=KEY)
    assert status == 200 and len(keyed.service.tokenizer.encode(body["response"], add_special_tokens=False)) <= 2
    status, _, body = request(keyed.port, "POST", "/", {"prompt": "你好！", "max_length": prompt_tokens}, key=KEY)
    assert status == 400 and f"the prompt alone is {prompt_tokens} tokens" in body["error"]["message"]


def test_bad_requests_are_answered_and_serving_goes_on(keyed):
    port = keyed.port
    status, headers, body = request(port, "GET", "/v1/models")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert request(port, "GET", "/v1/models", key=KEY + "x")[0] == 401
    assert request(port, "GET", "/health")[0] == 200  # no key needed
    status, _, body = request(port, "GET", "/v2/nothing", key=KEY)
    assert status == 404 and body["error"]["message"] == "no such endpoint: GET /v2/nothing"
    assert request(port, "GET", "/v1/chat/completions", key=KEY)[0] == 405

    status, _, body = request(port, "POST", "/v1/chat/completions", raw=b'{"messages": [', key=KEY)
    assert status == 400 and body["error"]["message"].startswith("the request body is not valid JSON")
    status, _, body = request(port, "POST", "/", raw="{'prompt': 'hi'}".encode(), key=KEY)
    assert status == 400
    for bad, where in [({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
                       ({"messages": []}, "messages"),
                       ({**QUESTION, "temperature": "hot"}, "temperature"),
                       ({**QUESTION, "top_p": 0}, "top_p"),
                       ({**QUESTION, "n": 2}, "n"),
                       ({**QUESTION, "max_tokens": 0}, "max_tokens"),
                       ({"prompt": "x"}, "messages")]:
        status, _, body = request(port, "POST", "/v1/chat/completions", bad, key=KEY)
        assert status == 422 and body["error"]["param"] == where, (bad, body)
        assert body["error"]["message"].startswith(where + ": ")
    status, _, body = request(port, "POST", "/", {"history": []}, key=KEY)
    assert status == 422 and body["error"]["param"] == "prompt"
    status, _, body = request(port, "POST", "/v1/chat/completions", {**QUESTION, "stop": ["\n"]}, key=KEY)
    assert status == 400 and "'stop' is not supported" in body["error"]["message"]

    # Rare characters: three byte tokens each.
    long_question = {"messages": [{"role": "user", "content": "".join(chr(0x4E00 + i * 7) for i in range(300))}]}
    status, _, body = request(port, "POST", "/v1/chat/completions", long_question, key=KEY)
    assert status == 400 and "over this server's limit of 200 (max_prompt_tokens)" in body["error"]["message"]
    status, _, body = request(port, "POST", "/", {"prompt": "x" * 100_000}, key=KEY)
    assert status == 400 and "max_prompt_tokens" in body["error"]["message"]

    status, _, body = request(port, "POST", "/v1/chat/completions", {**QUESTION, "max_tokens": 4}, key=KEY)
    assert status == 200 and body["usage"]["completion_tokens"] <= 4
    assert request(port, "GET", "/health")[2]["queue"] == 0


def test_full_queue_answers_429(keyed):
    gate, port = keyed.gate, keyed.port
    gate.shut()
    streams = []
    try:
        # One generating (its step held by the gate: jobs join only between steps) and
        # queue_size 2 waiting: the fourth is refused.
        streams.append(open_stream(port, {**QUESTION, "max_tokens": 8}))
        wait_for(lambda: keyed.service.scheduler.active == 1, what="the first job to start")
        streams += [open_stream(port, {**QUESTION, "max_tokens": 8}) for _ in range(2)]
        wait_for(lambda: keyed.service.scheduler.queued == 2, what="a full queue")
        status, headers, body = request(port, "POST", "/v1/chat/completions", QUESTION, key=KEY)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "queue_full" and "queue_size" in body["error"]["message"]
        status, _, body = request(port, "GET", "/health")
        assert status == 200 and (body["queue"], body["active"]) == (2, 1)
    finally:
        gate.open()
    for conn, response in streams:
        events = read_events(response)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        conn.close()
    assert request(port, "POST", "/v1/chat/completions", QUESTION, key=KEY)[0] == 200


def test_concurrent_requests_share_steps(keyed):
    gate, port, scheduler = keyed.gate, keyed.port, keyed.service.scheduler
    gate.shut()
    gate.widest = 0
    streams = [open_stream(port, {**QUESTION, "max_tokens": 8, "temperature": 0})]
    wait_for(lambda: scheduler.active == 1, what="the first job to start")
    streams.append(open_stream(port, {**QUESTION, "max_tokens": 8, "temperature": 0}))
    wait_for(lambda: scheduler.queued == 1, what="the second job to wait")
    # /health answers while the worker is busy: nothing waits on the model but the model's jobs.
    started = time.monotonic()
    assert request(port, "GET", "/health")[0] == 200 and time.monotonic() - started < 2
    gate.open()
    texts = []
    for conn, response in streams:
        events = read_events(response)
        texts.append("".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                             for e in events[:-1] if json.loads(e)["choices"]))
        conn.close()
    assert texts[0] == texts[1] and texts[0]  # greedy: batched or not, the same answer
    # The second job joined the first between two steps (engine), or waited for it (stream_chat).
    assert gate.widest == min(2, gate.capacity)


def test_failed_generation_answers_500_and_serving_goes_on(keyed):
    keyed.gate.fail_next = True
    status, _, body = request(keyed.port, "POST", "/v1/chat/completions", {**QUESTION, "max_tokens": 4}, key=KEY)
    assert status == 500 and body["error"]["message"] == "generation failed: RuntimeError: the model broke"
    keyed.gate.fail_next = True
    conn, response = open_stream(keyed.port, {**QUESTION, "max_tokens": 4})
    events = read_events(response)
    conn.close()
    assert json.loads(events[-1])["error"]["message"] == "RuntimeError: the model broke"
    status, _, body = request(keyed.port, "POST", "/", {"prompt": "你好！", "temperature": 0.01}, key=KEY)
    assert status == 200 and body["response"]
    assert request(keyed.port, "GET", "/health")[2]["active"] == 0


def test_disconnect_cancels_generation(keyed):
    gate, port, scheduler = keyed.gate, keyed.port, keyed.service.scheduler
    gate.shut()
    held = [open_stream(port, {**QUESTION, "max_tokens": 60})]
    wait_for(lambda: scheduler.active == 1, what="the first job to start")
    held += [open_stream(port, {**QUESTION, "max_tokens": 60}) for _ in range(2)]
    wait_for(lambda: scheduler.queued == 2, what="two waiting")
    running = list(scheduler.running)
    for conn, response in held:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    # The waiting two leave the queue while the worker is still held mid-step ...
    wait_for(lambda: scheduler.queued == 0, what="the queue to drain")
    gate.open()
    # ... and the generating two are dropped before their next token.
    wait_for(lambda: scheduler.active == 0, what="the generating jobs to stop")
    assert all(job.cancelled and job.done for job in running)
    assert all(gate.steps.get(job.id, 0) <= 2 for job in running), [gate.steps.get(j.id) for j in running]
    assert all(job.completion_tokens < 60 for job in running)
    assert request(port, "POST", "/v1/chat/completions", QUESTION, key=KEY)[0] == 200


def test_disconnect_of_a_whole_answer_cancels_it(keyed):
    gate, port, scheduler = keyed.gate, keyed.port, keyed.service.scheduler
    gate.shut()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**QUESTION, "max_tokens": 60}),
                 headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: scheduler.active == 1, what="the job to start")
    job = scheduler.running[0]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: job.cancelled, what="the disconnect to be seen")
    gate.open()
    wait_for(lambda: scheduler.active == 0, what="the job to stop")
    assert job.completion_tokens < 60 and gate.steps.get(job.id, 0) <= 2


def test_health_before_and_after_ready(model_dir):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(60)
        return server.load_model(settings)

    running = Running(model_dir, loader=slow_loader)
    try:
        status, headers, body = request(running.port, "GET", "/health")
        assert status == 503 and body["status"] == "loading" and body["ready_after_s"] is None
        status, headers, body = request(running.port, "POST", "/v1/chat/completions", QUESTION)
        assert status == 503 and body["error"]["message"] == "the model is still loading"
        assert headers["retry-after"] == "5"
        release.set()
        running.wait_ready()
        status, _, body = request(running.port, "GET", "/health")
        assert status == 200 and body["status"] == "ready"
        assert (body["variant"], body["device"], body["model_commit"], body["queue"]) == ("int4", "cpu", "c0ffee", 0)
        assert body["ready_after_s"] > 0 and body["uptime_s"] >= body["ready_after_s"]
        assert body["backend"] == "Gate"
        # What the deploy's report shows of a served host: the software and the peak memory.
        import torch
        import transformers

        assert body["versions"]["torch"] == torch.__version__
        assert body["versions"]["transformers"] == transformers.__version__
        assert 0.01 < body["peak_rss_gb"] < 64 and body["peak_vram_gb"] is None
        # no key set: every endpoint open, on loopback
        assert request(running.port, "GET", "/v1/models")[0] == 200
    finally:
        release.set()
        running.stop()


def test_failed_load_is_reported_and_stops_the_server(tmp_path):
    running = Running(str(tmp_path / "no-model"))
    running.thread.join(60)
    assert not running.thread.is_alive()  # the server exits (systemd's Restart= takes over)
    assert running.service.state == "failed" and running.service.error


def test_drain_timeout_cancels_what_is_still_running(model_dir):
    running = Running(model_dir, drain_timeout_s=0.5)
    running.wait_ready()
    running.gate.shut()
    conn, response = open_stream(running.port, {**QUESTION, "max_tokens": 60})
    wait_for(lambda: running.service.scheduler.active == 1, what="the job to start")
    job = running.service.scheduler.running[0]
    started = time.monotonic()
    running.uvicorn.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
    assert running.service.state == "draining"
    assert running.service.health()["status"] == "draining"
    # The request runs on until the drain timeout, then it is cancelled ...
    wait_for(lambda: job.cancelled, timeout=10, what="the drain timeout to cancel the request")
    assert 0.4 <= time.monotonic() - started < 5
    running.gate.open()  # (the worker was held mid-step by the gate, not by the drain)
    # ... and the server exits without waiting for the answer's end.
    running.thread.join(20)
    assert not running.thread.is_alive()
    assert job.completion_tokens < 60 and running.gate.steps.get(job.id, 0) <= 2
    assert "[DONE]" not in read_events(response)
    conn.close()


# --- the program: python -m runtime.server ---------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, **values):
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def start_program(config):
    return subprocess.Popen([sys.executable, "-m", "runtime.server", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_program_refuses_bad_settings(tmp_path):
    config = write_config(tmp_path / "server.toml", model_dir="/m", host="0.0.0.0", port=free_port())
    proc = subprocess.run([sys.executable, "-m", "runtime.server", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "setting 'host' is '0.0.0.0'" in proc.stderr and "api_key_file" in proc.stderr
    write_config(config, model_dir="/m", colour="blue")
    proc = subprocess.run([sys.executable, "-m", "runtime.server", "--config", str(config), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown setting 'colour'" in proc.stderr
    write_config(config, model_dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "runtime.server", "--config", str(config), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "setting 'model_dir'" in proc.stderr and "no config.json" in proc.stderr


def test_program_check_accepts_good_settings(model_dir, tmp_path):
    (tmp_path / "key").write_text(KEY)
    config = write_config(tmp_path / "server.toml", model_dir=model_dir, host="0.0.0.0", port=free_port(),
                          api_key_file=str(tmp_path / "key"))
    proc = subprocess.run([sys.executable, "-m", "runtime.server", "--config", str(config), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout and KEY not in proc.stdout + proc.stderr


def test_program_sigterm_drains_in_flight_requests(model_dir, tmp_path):
    (tmp_path / "key").write_text(KEY)
    port = free_port()
    # One at a time (stream_chat), so three requests wait behind the first when SIGTERM comes.
    config = write_config(tmp_path / "server.toml", model_dir=model_dir, port=port, backend="stream_chat",
                          api_key_file=str(tmp_path / "key"), max_tokens=48, drain_timeout_s=60)
    proc = start_program(config)
    try:
        wait_for(lambda: _health(port) == 200, timeout=120, what="the server to be ready")
        streams = [open_stream(port, {**QUESTION, "max_tokens": 48, "temperature": 0}) for _ in range(4)]
        wait_for(lambda: _health_body(port)["queue"] >= 2, what="requests waiting")
        proc.send_signal(signal.SIGTERM)
        # Nothing new is taken once draining began ...
        wait_for(lambda: _refused(port), timeout=10, what="the listening socket to close")
        # ... and every request that was in flight is answered to its end.
        for conn, response in streams:
            events = read_events(response)
            assert events[-1] == "[DONE]", events[-3:]
            assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
            conn.close()
        # uvicorn re-raises the signal once it has shut down; systemd counts death by SIGTERM as a clean stop.
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "draining: " in log
    assert KEY not in log


def _health_body(port):
    return request(port, "GET", "/health", timeout=5)[2]


def _health(port):
    try:
        return request(port, "GET", "/health", timeout=5)[0]
    except OSError:
        return None


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True
