"""Wait for the chat server to answer ready after the deploy (re)started its unit.

Run by the serve stage (operations/serve.ready) with the host's python3, standard library only.
Polls GET /health until it answers 200; then writes the fingerprint of what the service runs
(so the next deploy knows it needs no restart) and a JSON of the endpoint, the health answer
and the seconds from the unit's start to ready. On a timeout, or when systemd gave up or
restarted the unit 3 times, it exits 1 with an ERROR line and the unit's journal tail.
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
    write(args.result, json.dumps(result, indent=1) + "\n")
    write(args.fingerprint_file, args.fingerprint + "\n")
    print("SERVE-READY " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
