"""Weight fetch from the Seafile stand-in: our downloaders vs curl, memory and disk passes.

    .venv/bin/python bench/weight_fetch.py [--sizes 100,2048] [--rounds 5]   (MiB)
        [--downloaders control,host,control-thread,host-inline]

For each size: a random file is shared by the stand-in on loopback; then, round after
round, curl fetches it (-L follows the dl=1 redirect), the downloader (runtime/fetch.py)
fetches it into a cache as the control machine does (weights_mode=control: imported in a
process gevent has patched, as pyinfra's is: hashing on gevent's OS-thread pool, no fsync;
timed from the call, since the deploy imports the module once), and
the same file run as a program with a job file fetches it over its LFS pointer as a host
does (weights_mode=direct: hashing thread, fsync before the rename). The runs are
interleaved (curl, control, host, curl, ...) so that the noise of a shared machine falls on
all of them alike; each round's ratio compares runs of that round, and the median of the
rounds is reported; the order is shuffled each round (seeded: the same orders on every
run). `-thread`/`-inline` force HASH_THREAD on or off. Also: the peak RSS of the
downloading process and its bytes read/written on disk (one pass = 0 read, 1x written).
Results: bench/results/weight_fetch.{json,md}.
"""

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.seafile import SeafileStandIn  # noqa: E402

TOKEN = "benchtoken0000000000"
REPORT = """
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
# VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": elapsed, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "read_bytes": int(io["read_bytes"]),
                  "write_bytes": int(io["write_bytes"]), "peak_rss_mb": int(hwm) / 1024}}))
"""
CONTROL = """
from gevent import monkey; monkey.patch_all()  # as in pyinfra's process
import json, resource, sys, time
sys.path.insert(0, {root!r})
from runtime import fetch
if {thread} is not None:
    fetch.HASH_THREAD = {thread}
# pyinfra's process imports the module once, when the deploy loads: the call is timed.
t = time.perf_counter()
fetch.download(fetch.Share({share!r}), {path!r}, {dest!r}, {sha!r}, {size}, "bench", "weights_cache",
               lambda: False, hidden=False, fsync=False)
elapsed = time.perf_counter() - t
""" + REPORT
# As on a host: the file run as a program, timed from the start (imports included) to its exit.
HOST = """
import json, resource, runpy, sys, time
t = time.perf_counter()
sys.argv = ["fetch.py", {job!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
elapsed = time.perf_counter() - t
""" + REPORT


def make_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = block[i % 7:] + block[:i % 7]  # cheap, not all-equal blocks
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def write_job(tmp: Path, share: str, name: str, sha: str, size: int) -> Path:
    from operations.settings import VERIFIED

    model_dir = tmp / "model"
    model_dir.mkdir(exist_ok=True)
    job = tmp / "job.json"
    job.write_text(json.dumps({"mode": "seafile", "source": share, "folder": "/",
                               "model_dir": str(model_dir), "stamps": VERIFIED,
                               "files": [{"name": name, "oid": sha, "size": size}]}))
    return job


def run_child(code: str) -> dict:
    child = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


LABELS = {"control": "control (runtime/fetch.py imported)", "host": "host (runtime/fetch.py run)"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,2048")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--downloaders", default="control,host")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    who_all = args.downloaders.split(",")
    results = []
    base = ROOT / ".lab" if (ROOT / ".lab").exists() else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        tmp = Path(tmp)
        share_dir = tmp / "share"
        share_dir.mkdir()
        server = SeafileStandIn({TOKEN: str(share_dir)}, port=0)
        server.start()
        try:
            share = f"{server.url}/d/{TOKEN}/"
            for mib in (int(s) for s in args.sizes.split(",")):
                name = f"weights-{mib}M.bin"
                sha = make_file(share_dir / name, mib)
                size = mib << 20
                model_dir = tmp / "model"
                subprocess.run(["sync"])
                rounds = []
                shuffle = random.Random(mib).shuffle
                for _ in range(args.rounds):
                    got = {}
                    # A new order each round: a run in the wake of another one (its page cache
                    # freed, its writeback going on) measured up to 2x slower, so no downloader
                    # may always follow the same one.
                    order = ["curl", *who_all]
                    shuffle(order)
                    for who in order:
                        # Each run starts with no writeback of another one's pending.
                        subprocess.run(["sync"])
                        if who == "curl":
                            # the same file through the same redirect, written to disk.
                            t = time.perf_counter()
                            subprocess.run(["curl", "-fsSL", "-o", str(tmp / "curl.out"),
                                            f"{server.url}/d/{TOKEN}/files/?p=/{name}&dl=1"],
                                           check=True)
                            got["curl_s"] = time.perf_counter() - t
                            os.unlink(tmp / "curl.out")
                            continue
                        kind, _, mode = who.partition("-")
                        thread = {"thread": True, "inline": False}.get(mode)
                        if kind == "control":
                            dest = tmp / "cache.out"
                            got[who] = run_child(CONTROL.format(
                                root=str(ROOT), share=share, path=f"/{name}", dest=str(dest),
                                sha=sha, size=size, thread=thread))
                            os.unlink(dest)
                        else:
                            job = write_job(tmp, share, name, sha, size)
                            script = ROOT / "runtime" / "fetch.py"
                            if thread is not None:  # a copy with the switch set
                                script = tmp / f"fetch-{mode}.py"
                                script.write_text(re.sub(
                                    r"(?m)^HASH_THREAD = .*$", f"HASH_THREAD = {thread}",
                                    (ROOT / "runtime" / "fetch.py").read_text()))
                            (model_dir / name).write_text(f"pointer {sha} {size}\n")
                            got[who] = run_child(HOST.format(script=str(script), job=str(job)))
                            os.unlink(model_dir / name)
                            for stamp in (model_dir).rglob(".chatglm-verified/*"):
                                stamp.unlink()
                    rounds.append(got)
                    print(json.dumps({"size_mib": mib, "curl_s": round(got["curl_s"], 3),
                                      **{f"{w}_s": round(got[w]["seconds"], 3) for w in who_all},
                                      **{f"{w}_cpu_s": round(got[w]["cpu_s"], 3)
                                         for w in who_all}}), flush=True)
                os.unlink(share_dir / name)
                med = statistics.median
                row = {"size_mib": mib, "rounds": args.rounds,
                       "curl_mib_s": round(mib / med(r["curl_s"] for r in rounds), 1)}
                for who in who_all:
                    runs = [r[who] for r in rounds]
                    ratios = [r["curl_s"] / r[who]["seconds"] for r in rounds]
                    row[who] = {
                        "mib_s": round(mib / med(r["seconds"] for r in runs), 1),
                        "ratio": round(med(ratios), 3),
                        "ratio_min": round(min(ratios), 3),
                        "ratio_max": round(max(ratios), 3),
                        "cpu_s": round(med(r["cpu_s"] for r in runs), 2),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
                        "disk_read_bytes": max(r["read_bytes"] for r in runs),
                        "disk_write_passes": round(max(r["write_bytes"] for r in runs) / size, 3),
                    }
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    lines = ["| size | downloader | curl MiB/s | ours MiB/s | ours/curl, median of rounds "
             "(lowest-highest) (target >= 0.9) | CPU s | peak RSS MB (target < 200, flat) "
             "| disk read bytes | write passes (target 1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for who in who_all:
            kind, _, mode = who.partition("-")
            label = LABELS[kind] + (f", hash thread {'on' if mode == 'thread' else 'off'}"
                                    if mode else "")
            c = r[who]
            lines.append(f"| {r['size_mib']} MiB | {label} | {r['curl_mib_s']} | {c['mib_s']} | "
                         f"{c['ratio']} ({c['ratio_min']}-{c['ratio_max']}) | {c['cpu_s']} | "
                         f"{c['peak_rss_mb']} | {c['disk_read_bytes']} | "
                         f"{c['disk_write_passes']} |")
    lines.append("")
    lines.append(f"{results[0]['rounds'] if results else 0} rounds per size, interleaved "
                 f"(curl, {', '.join(who_all)}; a new order each round), on a machine with {len(os.sched_getaffinity(0))} "
                 "CPUs; the host downloader fsyncs the file before it replaces the pointer, so "
                 "its time includes the flush to disk.")
    print("\n".join(lines))
    if not args.no_write:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "weight_fetch.json").write_text(json.dumps(results, indent=1))
        (out / "weight_fetch.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
