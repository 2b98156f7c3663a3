"""Serving load: runtime/server.py against a server built the way upstream's api.py is.

    .venv/bin/python bench/serve_load.py [--model-dir DIR] [--levels 1,4,16] [--requests-per-client 4]
                                         [--rounds 3] [--max-tokens 64] [--threads 1]
                                         [--servers engine,stream_chat,api_py]

Servers on 127.0.0.1, the int4 fixture model on CPU (built into a temporary directory unless
--model-dir names one); all are started first, and only one is under load at a time: round
after round, each level runs against each server in turn, so the noise of a shared machine falls
on all of them alike, and each figure is the median of the rounds. Servers:
- engine: `python -m runtime.server`, backend "engine" (runtime/engine.py, continuous batching)
- stream_chat: `python -m runtime.server`, backend "stream_chat" (one request at a time)
- api_py: this file's --api-py-server: FastAPI + uvicorn, one worker, the blocking model.chat()
  called inside the async handler, answers on POST / (what upstream's api.py does)
For each concurrency level, that many clients each send --requests-per-client requests one
after the other, at least 16 requests per level (bounded: also stopped by a per-level deadline). Ours stream (time to first
token = time to the first chunk with text); api_py answers whole (time to first token = time to
the whole answer: its clients see nothing before). Generated tokens are counted the same way for
all: the answer's text tokenized again. Greedy decoding (temperature 0; api_py 0.01, which the
model's sampler treats the same), the five smoke-test questions in turn. Besides wall-clock
figures, each server's own CPU time per level (from /proc): tokens per server CPU-second is what
other processes on a shared machine disturb least.
Results: bench/results/serve_load.{json,md}.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
LEVEL_DEADLINE_S = 300


# --- the api.py-style server ---------------------------------------------------------------------

def api_py_server(model_dir: str, port: int, device: str) -> None:
    """FastAPI, one uvicorn worker, model.chat() called straight from the async handler: while
    one answer is generated the event loop runs nothing else."""
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    model = (model.half().cuda() if device == "cuda" else model.float()).eval()
    app = FastAPI()

    @app.post("/")
    async def chat(request: Request):
        body = await request.json()
        response, history = model.chat(tokenizer, body["prompt"], history=body.get("history") or [],
                                       max_length=body.get("max_length") or 2048, top_p=body.get("top_p") or 0.7,
                                       temperature=body.get("temperature") or 0.95)
        return {"response": response, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.get("/health")
    async def health():
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning")


# --- a small HTTP client (asyncio streams: light, so the server gets the CPU) -------------------

async def post(port: int, path: str, body: dict):
    """(status, seconds to the first text, seconds to the end, answer text)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    first, text = None, ""
    if headers.get("transfer-encoding") == "chunked":
        pending = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            pending += await reader.readexactly(size)
            await reader.readexactly(2)
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                payload = event.decode()[len("data: "):]
                if payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                for choice in chunk.get("choices", []):
                    content = choice["delta"].get("content") or ""
                    if content and first is None:
                        first = time.perf_counter() - started
                    text += content
    else:
        raw = await reader.readexactly(int(headers.get("content-length", 0)))
        first = time.perf_counter() - started
        text = json.loads(raw).get("response", "") if status == 200 else ""
    writer.close()
    end = time.perf_counter() - started
    return status, first if first is not None else end, end, text


def questions():
    from lab.fixtures.corpus import CONVERSATION

    return [q for q, _ in CONVERSATION]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(kind: str, port: int, clients: int, per_client: int, max_tokens: int, count_tokens,
                    pid: int = 0):
    qs = questions()
    results = []
    deadline = time.monotonic() + LEVEL_DEADLINE_S

    async def client(index: int):
        for n in range(per_client):
            if time.monotonic() > deadline:
                return
            query = qs[(index + n) % len(qs)]
            if kind == "api_py":
                body, path = {"prompt": query, "history": [], "temperature": 0.01}, "/"
            else:
                body, path = {"messages": [{"role": "user", "content": query}], "stream": True,
                              "max_tokens": max_tokens, "temperature": 0}, "/v1/chat/completions"
            results.append(await post(port, path, body))

    cpu = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu if pid else 0.0
    ok = [r for r in results if r[0] == 200]
    ttft = sorted(r[1] for r in ok)
    tokens = sum(count_tokens(r[3]) for r in ok)

    def pct(p):
        return ttft[min(len(ttft) - 1, int(round(p / 100 * (len(ttft) - 1))))] if ttft else None

    return {"server": kind, "concurrency": clients, "requests": len(results), "failed": len(results) - len(ok),
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(pct(50), 4), "ttft_p99_s": round(pct(99), 4),
            # What the server itself spent: the figure other processes on a shared machine disturb least.
            "server_cpu_s": round(cpu, 3), "tokens_per_server_cpu_s": round(tokens / cpu, 1) if cpu else None}


def median_row(rounds: list) -> dict:
    """One row: the median of each figure over the rounds (the spread of tokens/s beside it)."""
    row = dict(rounds[0])
    for name in ("wall_s", "requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tokens_per_server_cpu_s"):
        row[name] = statistics.median(r[name] or 0 for r in rounds)
    row["tokens_per_s_range"] = [min(r["tokens_per_s"] for r in rounds), max(r["tokens_per_s"] for r in rounds)]
    row["requests"] = sum(r["requests"] for r in rounds)
    row["failed"] = sum(r["failed"] for r in rounds)
    row["tokens"] = sum(r["tokens"] for r in rounds)
    row["rounds"] = rounds
    return row


# --- running servers -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model_dir: str, port: int, max_tokens: int, max_batch: int, workdir: Path, device: str):
    if kind == "api_py":
        argv = [sys.executable, __file__, "--api-py-server", "--model-dir", model_dir, "--port", str(port),
                "--device", device]
    else:
        config = workdir / f"{kind}.toml"
        config.write_text(f'model_dir = "{model_dir}"\nport = {port}\nbackend = "{kind}"\ndevice = "{device}"\n'
                          f"max_batch = {max_batch}\nqueue_size = 64\nmax_tokens = {max_tokens}\n")
        argv = [sys.executable, "-m", "runtime.server", "--config", str(config)]
    log = open(workdir / f"{kind}.log", "w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).split()[1] == b"200":
                    return proc
        except (OSError, IndexError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{kind} server did not become ready; see {workdir / (kind + '.log')}")
        time.sleep(0.2)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report_model(args) -> str:
    where = "CPU (float32)" if args.device == "cpu" else "the GPU (fp16)"
    return f"the {args.variant if not args.model_dir else Path(args.model_dir).name} fixture on {where}"


def markdown(report: dict) -> str:
    rows = ["| server | concurrency | requests (all rounds) | requests/s | generated tokens/s (lowest-highest) | "
            "TTFT p50 ms | TTFT p99 ms | tokens per server CPU-second |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        low, high = r["tokens_per_s_range"]
        rows.append(f"| {r['server']} | {r['concurrency']} | {r['requests'] - r['failed']}/{r['requests']} | "
                    f"{r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | "
                    f"{r['ttft_p50_s'] * 1000:.1f} | {r['ttft_p99_s'] * 1000:.1f} | "
                    f"{r['tokens_per_server_cpu_s']:.0f} |")
    lines = ["\n".join(rows), ""]
    for name, check in report["targets"].items():
        lines.append(f"- {name}: {check}")
    lines += ["", report["setup"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=4, help="(at least 16 requests per level)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--servers", default="engine,stream_chat,api_py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of every server (OMP_NUM_THREADS; 0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (float32) or cuda (fp16), for every server")
    parser.add_argument("--variant", default="int4", help="the fixture built when --model-dir is not given")
    parser.add_argument("--results-name", default="serve_load", help="<out>/<name>.{json,md}")
    parser.add_argument("--out", default=str(RESULTS), help="where results go (default bench/results)")
    parser.add_argument("--api-py-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="serve-load-hf-"))
    if args.threads:  # inherited by every server: the same torch threading for all of them
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.api_py_server:
        api_py_server(args.model_dir, args.port, args.device)
        return

    workdir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = args.model_dir
    if not model_dir:
        from lab.fixtures import build

        print("building the fixture models ...", file=sys.stderr)
        model_dir = build.build_fixtures(workdir / "models")[args.variant]["dir"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)

    def count_tokens(text):
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    levels = [int(x) for x in args.levels.split(",")]
    kinds = args.servers.split(",")
    servers = {}
    samples = {(kind, level): [] for kind in kinds for level in levels}
    try:
        for kind in kinds:
            servers[kind] = (free_port(), None)
            servers[kind] = (servers[kind][0], start(kind, model_dir, servers[kind][0], args.max_tokens,
                                                     max(levels), workdir, args.device))
        for kind in kinds:  # warm-up: first requests pay one-time costs
            asyncio.run(run_level(kind, servers[kind][0], 4, 2, args.max_tokens, count_tokens))
        for round_ in range(args.rounds):
            for level in levels:
                for kind in kinds:
                    # At least 16 requests per level, so a low level's p99 is not one request's time.
                    per_client = max(args.requests_per_client, -(-16 // level))
                    row = asyncio.run(run_level(kind, servers[kind][0], level, per_client,
                                                args.max_tokens, count_tokens, servers[kind][1].pid))
                    print(json.dumps({"round": round_, **row}), flush=True)
                    samples[kind, level].append(row)
    finally:
        for port, proc in servers.values():
            if proc is not None:
                stop(proc)
    rows = [median_row(samples[kind, level]) for kind in kinds for level in levels]

    top = max(levels)
    targets = {}

    def ratios(numerators, denominators, name):
        """Round by round (the rows of one round ran minutes apart at most), then the median."""
        values = [n[name] / d[name] for n, d in zip(numerators, denominators) if n[name] and d[name]] or [float("nan")]
        return statistics.median(values), min(values), max(values)

    for server in ("engine", "stream_chat"):
        if server not in kinds:
            continue
        if "api_py" in kinds:
            mid, low, high = ratios(samples[server, top], samples["api_py", top], "tokens_per_s")
            targets[f"{server}: tokens/s at concurrency {top} vs api_py (target >= 4x)"] = (
                f"{mid:.2f}x (rounds {low:.2f}-{high:.2f}): {'met' if mid >= 4 else 'NOT met'}")
            mid, low, high = ratios(samples[server, top], samples["api_py", top], "tokens_per_server_cpu_s")
            targets[f"{server}: tokens per server CPU-second at concurrency {top} vs api_py (no target; "
                    "the least disturbed figure)"] = f"{mid:.2f}x (rounds {low:.2f}-{high:.2f})"
        if 1 in levels:
            mid, low, high = ratios(samples[server, top], samples[server, 1], "ttft_p99_s")
            targets[f"{server}: TTFT p99 at concurrency {top} vs its own at 1 (target <= 5x)"] = (
                f"{mid:.2f}x (rounds {low:.2f}-{high:.2f}): {'met' if mid <= 5 else 'NOT met'}")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
              "python": platform.python_version(), "model": f"{args.model_dir or args.variant + ' fixture'} on {args.device}",
              "device": args.device,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "rounds": args.rounds, "torch_threads": args.threads or "default",
              "rows": rows, "targets": targets,
              "setup": (f"Servers on 127.0.0.1, one under load at a time, {report_model(args)}, "
                        f"{os.cpu_count()} CPUs shared with the load generator, torch threads "
                        f"{args.threads or 'default'} in every server; each client sends "
                        f"{args.requests_per_client} requests in a row, at least 16 per level (greedy, "
                        f"max_tokens {args.max_tokens}); "
                        f"medians of {args.rounds} interleaved rounds. api_py's time to first token is the time to "
                        "its whole answer (it does not stream). p99 of at most 64 samples is close to the maximum.")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.results_name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.results_name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
