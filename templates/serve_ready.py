"""Wait for the chat server to answer ready after the deploy (re)started its unit.

Run by the serve stage (operations/serve.ready) with the host's python3, standard library only.
Polls GET /health until it answers 200; then, with --chat, holds one conversation of the smoke
queries with the running service over POST /v1/chat/completions, streamed, as a client would
(time to first token, seconds, tokens and tokens/s per answer): with the serve stage on, this is
the deploy's smoke test. Then it writes the fingerprint of what the service runs (so the next
deploy knows it needs no restart) and a JSON of the endpoint, the health answer (after the
conversation, when there was one: the server's peak memory includes it), the seconds from the
unit's start to ready and the answers.
On a timeout, or when systemd gave up or restarted the unit 3 times, or when the
conversation fails, it exits 1 with an ERROR line (and the unit's journal tail).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request


def show(unit: str, prop: str) -> str:
    out = subprocess.run(["systemctl", "show", "-p", prop, "--value", unit],
                         capture_output=True, text=True)
    return out.stdout.strip()


def journal(unit: str, lines: int = 30) -> str:
    out = subprocess.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
                         capture_output=True, text=True)
    return (out.stdout or out.stderr).rstrip()


def chat(base: str, key: str, queries: list[str], max_tokens: int) -> list[dict]:
    """The queries as one conversation (each answer joins the history), streamed."""
    messages, answers = [], []
    for query in queries:
        messages.append({"role": "user", "content": query})
        body = {"model": "chatglm-6b", "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}}
        if max_tokens:
            body["max_tokens"] = max_tokens
        request = urllib.request.Request(
            base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        start, first, text, usage = time.monotonic(), None, [], {}
        with urllib.request.urlopen(request, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and first is None:
                        first = time.monotonic()
                    text.append(piece)
        end = time.monotonic()
        reply = "".join(text)
        if not reply.strip():
            raise RuntimeError(f"the service answered {query!r} with nothing")
        tokens = usage.get("completion_tokens", 0)
        answers.append({"query": query, "response": reply, "tokens": tokens,
                        "ttft_s": round(first - start, 3), "seconds": round(end - start, 3),
                        "tokens_per_s": round(tokens / (end - start), 2) if end > start else None})
        messages.append({"role": "assistant", "content": reply})
    return answers


def write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("url", "endpoint", "unit", "fingerprint", "fingerprint-file", "result"):
        p.add_argument("--" + name, required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--chat", help="a JSON list of queries to ask as one conversation once ready")
    p.add_argument("--key-file", help="the API key the conversation sends")
    p.add_argument("--max-tokens", type=int, default=0)
    args = p.parse_args()
    restarts0 = int(show(args.unit, "NRestarts") or 0)
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(args.url, timeout=5) as r:
                health = json.load(r)
                break
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
        except (OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        state = show(args.unit, "ActiveState")
        restarts = int(show(args.unit, "NRestarts") or 0) - restarts0
        why = ("systemd gave up on it" if state == "failed" else
               f"it crashed and was restarted {restarts} times" if restarts >= 3 else
               f"it was not ready within {args.timeout:g} s" if time.monotonic() > deadline else "")
        if why:
            print(f"ERROR: {args.unit} did not answer ready on {args.url}: {why} (last answer: {last}); "
                  "the unit's journal follows", file=sys.stderr)
            print(journal(args.unit), file=sys.stderr)
            return 1
        time.sleep(0.5)
    started_us = int(show(args.unit, "ExecMainStartTimestampMonotonic") or 0)
    ready_s = time.clock_gettime(time.CLOCK_MONOTONIC) - started_us / 1e6 if started_us else None
    result = {"endpoint": args.endpoint, "unit": args.unit, "health": health,
              "ready_s": None if ready_s is None else round(ready_s, 2),
              "main_pid": int(show(args.unit, "MainPID") or 0),
              "ready_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.chat:
        with open(args.chat) as f:
            queries = json.load(f)
        with open(args.key_file) as f:
            key = f.read().strip()
        try:
            result["answers"] = chat(args.url.rsplit("/health", 1)[0], key, queries, args.max_tokens)
            with urllib.request.urlopen(args.url, timeout=30) as r:
                result["health"] = json.load(r)
        except (OSError, ValueError, RuntimeError) as exc:
            detail = exc.read(300).decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else ""
            print(f"ERROR: the conversation with {args.unit} failed: {exc} {detail}".rstrip(), file=sys.stderr)
            print(journal(args.unit), file=sys.stderr)
            return 1
    write(args.result, json.dumps(result, indent=1) + "\n")
    write(args.fingerprint_file, args.fingerprint + "\n")
    print("SERVE-READY " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
