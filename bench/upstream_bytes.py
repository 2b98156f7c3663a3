"""Upstream bytes: what the Seafile share serves for N hosts, weights_mode control vs direct.

    .venv/bin/python bench/upstream_bytes.py [--hosts 1,2,4]

Runs its own lab (.lab-upstream, port offset 700) so it does not disturb a running one.
For each mode and each N: a fresh install_dir on hosts h1..hN (so every host needs the
weights again), for control a fresh, empty control cache, the stand-in's /_lab/stats
reset; then `pyinfra deploy.py` with the system, model and kernel stages on those hosts,
and the bytes the share served (GET /_lab/stats) compared with the size of the model's
weight files. Target: control serves the model once whatever N is (1x); direct serves it
once per host (N x). A preparation deploy (not measured) installs the system packages.
Results: bench/results/upstream_bytes.{json,md}.
"""

import argparse
import json
import runpy
import shutil
import urllib.request
from pathlib import Path

from labrun import ROOT, own_lab, prepare, pyinfra

lab = own_lab(".lab-upstream", 700)

VARIANT = "int4"
MODEL = "chatglm-6b-int4"
STAGES = "system,model,kernel"


def stats(method="GET") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{lab.PORTS['seafile']}/_lab/stats",
                                 method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def write_inventory(base: Path, name: str, hosts: list[str], data: dict) -> Path:
    """A copy of the lab's inventory with only `hosts`, each with `data` on top."""
    lab_hosts = dict(runpy.run_path(str(base))["lab"])
    lines = ['"""Written by bench/upstream_bytes.py for one measurement (do not edit)."""', "",
             "lab = ["]
    for host in hosts:
        lines.append(f"    ({host!r}, {({**lab_hosts[host], **data})!r}),")
    lines.append("]")
    path = lab.LAB / f"inventory-{name}.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="1,2,4")
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    names = [f"h{i}" for i in range(1, max(counts) + 1)]
    base = lab.up(len(names), variants={h: VARIANT for h in names})
    share_folder = lab.LAB / "share" / "quantized" / MODEL
    model_bytes = sum(p.stat().st_size for p in share_folder.iterdir() if p.is_file())
    results = {"model": MODEL, "model_bytes": model_bytes, "runs": []}
    try:
        prep = write_inventory(base, "prepare", names, {
            "stages": STAGES, "install_dir": "/opt/chatglm-prepare",
            "weights_cache": str(lab.LAB / "cache-prepare")})
        prepare(prep, "deploy.py")
        for mode in ("control", "direct"):
            for n in counts:
                tag = f"{mode}-{n}"
                # Empty even where an earlier bench run left this row's blobs behind (a
                # rerun of the bench measured 0 bytes for control mode before this).
                shutil.rmtree(lab.LAB / f"cache-{tag}", ignore_errors=True)
                inventory = write_inventory(base, tag, names[:n], {
                    "stages": STAGES, "weights_mode": mode,
                    "install_dir": f"/opt/chatglm-{tag}",  # fresh: nothing fetched yet
                    "weights_cache": str(lab.LAB / f"cache-{tag}")})  # fresh, empty
                stats("DELETE")
                seconds = pyinfra(inventory, "deploy.py")[0]
                got = stats()
                row = {"mode": mode, "hosts": n, "bytes_served": got["bytes_sent"],
                       "x_model": round(got["bytes_sent"] / model_bytes, 3),
                       "target_x": 1 if mode == "control" else n,
                       "redirects": got["redirects"], "requests": got["requests"],
                       "per_file": got["per_file"], "deploy_s": round(seconds, 1)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        lab.down()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "upstream_bytes.json").write_text(json.dumps(results, indent=1))
    md = [f"Model: {MODEL} fixture, {model_bytes} bytes of weight files in the share; stages "
          f"{STAGES}; a fresh install_dir (and control cache) per row.", "",
          "| weights_mode | hosts | bytes served by the share | x model size | target "
          "| dl=1 redirects | requests | deploy s |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        md.append(f"| {r['mode']} | {r['hosts']} | {r['bytes_served']} | {r['x_model']}x | "
                  f"{r['target_x']}x | {r['redirects']} | {r['requests']} | {r['deploy_s']} |")
    (out / "upstream_bytes.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
