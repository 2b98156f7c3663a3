"""What a deploy costs: no-op reruns against bare pyinfra, scaling with hosts, stage times.

    .venv/bin/python bench/deploy_costs.py

Runs its own lab (.lab-bench, port offset 900) so it does not disturb a running one:
 1. 4 hosts, full deploy; then the median of 3 no-op reruns vs 3 `pyinfra exec -- true`
    on the same hosts (target: <= 2.0x).
 2. 16 hosts with the system/model/kernel stages (a full deploy's torch install x16 does
    not fit this 2-core machine); median no-op rerun on 1, 4, 8, 16 of them (target: 16
    hosts <= 1.5x of 1 host).
 3. Per-stage times of the first full deploy on one host (from 1's run of h1).
Results: bench/results/deploy_costs.{json,md}.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CHATGLM_LAB_DIR", str(ROOT / ".lab-bench"))
os.environ.setdefault("CHATGLM_LAB_PORT_OFFSET", "900")
sys.path.insert(0, str(ROOT))

from lab import lab  # noqa: E402

PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
LIGHT = {"stages": "system,model,kernel"}
RUNS = 3


def pyinfra(inventory, *args, env=None):
    t = time.perf_counter()
    proc = subprocess.run([PYINFRA, "-y", str(inventory), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"pyinfra {' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return elapsed, proc.stdout


def prepare(inventory, *args):
    """A preparation deploy (not measured): a rerun converges if a host hiccuped."""
    try:
        pyinfra(inventory, *args)
    except SystemExit as first:
        print(f"preparation failed once, rerunning: {str(first)[-300:]}", flush=True)
        pyinfra(inventory, *args)


def limit(hosts):
    return [a for h in hosts for a in ("--limit", h)]


def median_of(inventory, *args):
    return statistics.median(pyinfra(inventory, *args)[0] for _ in range(RUNS))


def main():
    full = [f"h{i}" for i in range(1, 5)]
    light = [f"h{i}" for i in range(5, 21)]
    reports = {"report_dir": str(ROOT / ".lab-bench" / "reports")}
    inventory = lab.up(20, variants={h: "int4" for h in full + light},
                       extra={**{h: dict(reports) for h in full},
                              **{h: {**LIGHT, **reports} for h in light}})
    results = {}
    try:
        times = ROOT / ".lab-bench" / "times.json"
        env = {**os.environ, "CHATGLM_BENCH_TIMES": str(times)}
        first, _ = pyinfra(inventory, "bench/stage_timer.py", *limit(["h1"]), env=env)
        stages = {}
        for name, start, end in json.loads(times.read_text()):
            stage = name.split(":")[0]
            stages[stage] = round(stages.get(stage, 0) + (end - start), 2)
        results["first_deploy_one_host_s"] = round(first, 1)
        results["stage_seconds"] = stages

        prepare(inventory, "deploy.py", *limit(full[1:]))
        noop = median_of(inventory, "deploy.py", *limit(full))
        bare = median_of(inventory, "exec", *limit(full), "--", "true")
        results["noop_4_hosts_s"] = round(noop, 2)
        results["exec_true_4_hosts_s"] = round(bare, 2)
        results["noop_vs_exec_ratio"] = round(noop / bare, 2)

        prepare(inventory, "deploy.py", *limit(light))
        scaling = {}
        for n in (1, 4, 8, 16):
            scaling[n] = round(median_of(inventory, "deploy.py", *limit(light[:n])), 2)
        results["noop_light_by_hosts_s"] = scaling
        results["noop_16_vs_1_ratio"] = round(scaling[16] / scaling[1], 2)
    finally:
        lab.down()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_costs.json").write_text(json.dumps(results, indent=1))
    md = [
        "| measure | value | target |", "|---|---|---|",
        f"| first full deploy, 1 host | {results['first_deploy_one_host_s']} s | - |",
        *(f"| - stage {k} | {v} s | - |" for k, v in results["stage_seconds"].items()),
        f"| no-op rerun, 4 hosts (full deploy) | {results['noop_4_hosts_s']} s | - |",
        f"| `pyinfra exec -- true`, same 4 hosts | {results['exec_true_4_hosts_s']} s | - |",
        f"| ratio no-op / exec | {results['noop_vs_exec_ratio']}x | <= 2.0x |",
        *(f"| no-op rerun, {n} hosts (system/model/kernel) | {v} s | - |"
          for n, v in results["noop_light_by_hosts_s"].items()),
        f"| ratio 16 hosts / 1 host | {results['noop_16_vs_1_ratio']}x | <= 1.5x |",
    ]
    (out / "deploy_costs.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
