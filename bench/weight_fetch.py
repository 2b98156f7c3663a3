"""Weight fetch from the Seafile stand-in: our downloader vs curl, memory and disk passes.

    .venv/bin/python bench/weight_fetch.py [--sizes 100,2048]   (MiB)

For each size: a random file is shared by the stand-in on loopback; curl fetches it
(-L follows the dl=1 redirect) and our downloader fetches it (302, Range-capable
stream, sha256 while writing). Prints throughput of both and their ratio, the peak RSS
of the downloading process, and its bytes read/written on disk (one pass = 0 read,
1x written). Results: bench/results/weight_fetch.{json,md}.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.seafile import SeafileStandIn  # noqa: E402

CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from operations.seafile import download
t = time.perf_counter()
download({share!r}, {path!r}, {dest!r}, {sha!r}, {size}, progress=False)
elapsed = time.perf_counter() - t
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({{"seconds": elapsed, "read_bytes": int(io["read_bytes"]),
                  "write_bytes": int(io["write_bytes"]),
                  "rchar": int(io["rchar"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = block[i % 7:] + block[:i % 7]  # cheap, not all-equal blocks
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,2048")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".lab" if (ROOT / ".lab").exists() else None) as tmp:
        tmp = Path(tmp)
        share_dir = tmp / "share"
        share_dir.mkdir()
        server = SeafileStandIn({"benchtoken0000000000": str(share_dir)}, port=0)
        server.start()
        try:
            share = f"{server.url}/d/benchtoken0000000000/"
            for mib in (int(s) for s in args.sizes.split(",")):
                name = f"weights-{mib}M.bin"
                sha = make_file(share_dir / name, mib)
                size = mib << 20
                subprocess.run(["sync"])
                # curl: the same file through the same redirect, written to disk.
                t = time.perf_counter()
                subprocess.run(["curl", "-fsSL", "-o", str(tmp / "curl.out"),
                                f"{server.url}/d/benchtoken0000000000/files/?p=/{name}&dl=1"],
                               check=True)
                curl_s = time.perf_counter() - t
                os.unlink(tmp / "curl.out")
                dest = tmp / "ours.out"
                child = subprocess.run(
                    [sys.executable, "-c", CHILD.format(root=str(ROOT), share=share, path=f"/{name}",
                                                        dest=str(dest), sha=sha, size=size)],
                    check=True, capture_output=True, text=True)
                ours = json.loads(child.stdout.strip().splitlines()[-1])
                os.unlink(dest)
                os.unlink(share_dir / name)
                results.append({
                    "size_mib": mib,
                    "curl_mib_s": round(mib / curl_s, 1),
                    "ours_mib_s": round(mib / ours["seconds"], 1),
                    "ratio": round(curl_s / ours["seconds"], 3),
                    "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                    "disk_read_bytes": ours["read_bytes"],
                    "disk_write_passes": round(ours["write_bytes"] / size, 3),
                })
                print(json.dumps(results[-1]), flush=True)
        finally:
            server.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_fetch.json").write_text(json.dumps(results, indent=1))
    lines = ["| size | curl MiB/s | ours MiB/s | ours/curl (target >= 0.9) | peak RSS MB (target < 200, flat) "
             "| disk read bytes | write passes (target 1) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size_mib']} MiB | {r['curl_mib_s']} | {r['ours_mib_s']} | {r['ratio']} | "
                     f"{r['peak_rss_mb']} | {r['disk_read_bytes']} | {r['disk_write_passes']} |")
    (out / "weight_fetch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
