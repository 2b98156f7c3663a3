"""What a deploy costs: no-op reruns against bare pyinfra, scaling with hosts, stage times.

    .venv/bin/python bench/deploy_costs.py

Runs its own lab (.lab-bench, port offset 900) so it does not disturb a running one:
 1. 4 hosts, full deploy; then the median of 5 no-op reruns vs 5 `pyinfra exec -- true`
    on the same hosts (target: <= 2.0x), and the SSH commands a no-op rerun costs a host.
 2. 16 hosts with the system/model/kernel stages (a full deploy's torch install x16 does
    not fit this 2-core machine); median no-op rerun on 1, 4, 8, 16 of them (target: 16
    hosts <= 1.5x of 1 host), with the control process's CPU time, and `exec -- true` on
    1 and 16 of them: the lab's hosts share the control machine's 2 cores, so what bare
    pyinfra gains per host here is the floor of this figure.
 3. Per-stage times of the first full deploy on one host (from 1's run of h1).
Preparation runs (not measured) converge the hosts and record each host's fact list
(operations/factcache.py), as any earlier run of the deploy does.
Results: bench/results/deploy_costs.{json,md}.
"""

import json
import os
import re
import statistics

from labrun import ROOT, own_lab, prepare, pyinfra

lab = own_lab(".lab-bench", 900)

LIGHT = {"stages": "system,model,kernel"}
RUNS = 5


def commands_per_host(inventory, hosts):
    """SSH commands pyinfra runs per host in one no-op rerun (from its --debug log)."""
    out = pyinfra(inventory, "deploy.py", *limit(hosts), "--debug")[1]
    counts = [len(re.findall(rf"Running command on {h}:", out)) for h in hosts]
    return statistics.median(counts)


def limit(hosts):
    return [a for h in hosts for a in ("--limit", h)]


def median_of(inventory, *args):
    return statistics.median(pyinfra(inventory, *args)[0] for _ in range(RUNS))


def medians_of(inventory, *args):
    """Median wall and median control CPU seconds of RUNS runs."""
    runs = [pyinfra(inventory, *args, cpu=True) for _ in range(RUNS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[2] for r in runs)


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
        prepare(inventory, "deploy.py", *limit(full))  # records each host's fact list
        results["ssh_commands_per_host_noop"] = commands_per_host(inventory, full)
        noop = median_of(inventory, "deploy.py", *limit(full))
        bare = median_of(inventory, "exec", *limit(full), "--", "true")
        results["noop_4_hosts_s"] = round(noop, 2)
        results["exec_true_4_hosts_s"] = round(bare, 2)
        results["noop_vs_exec_ratio"] = round(noop / bare, 2)

        prepare(inventory, "deploy.py", *limit(light))
        prepare(inventory, "deploy.py", *limit(light))
        scaling, cpu, bare_scaling = {}, {}, {}
        for n in (1, 4, 8, 16):
            wall, used = medians_of(inventory, "deploy.py", *limit(light[:n]))
            scaling[n], cpu[n] = round(wall, 2), round(used, 2)
        for n in (1, 16):
            bare_scaling[n] = round(median_of(inventory, "exec", *limit(light[:n]), "--", "true"), 2)
        results["noop_light_by_hosts_s"] = scaling
        results["noop_16_vs_1_ratio"] = round(scaling[16] / scaling[1], 2)
        results["control_cpu_light_by_hosts_s"] = cpu
        results["control_cpu_16_vs_1_ratio"] = round(cpu[16] / cpu[1], 2)
        results["exec_true_light_by_hosts_s"] = bare_scaling
        results["exec_true_16_vs_1_ratio"] = round(bare_scaling[16] / bare_scaling[1], 2)
        results["load_average"] = os.getloadavg()[0]
    finally:
        lab.down()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_costs.json").write_text(json.dumps(results, indent=1))
    md = [
        "| measure | value | target |", "|---|---|---|",
        f"| first full deploy, 1 host | {results['first_deploy_one_host_s']} s | - |",
        *(f"| - stage {k} | {v} s | - |" for k, v in results["stage_seconds"].items()),
        f"| SSH commands per host, no-op rerun | {results['ssh_commands_per_host_noop']} | - |",
        f"| no-op rerun, 4 hosts (full deploy) | {results['noop_4_hosts_s']} s | - |",
        f"| `pyinfra exec -- true`, same 4 hosts | {results['exec_true_4_hosts_s']} s | - |",
        f"| ratio no-op / exec | {results['noop_vs_exec_ratio']}x | <= 2.0x |",
        *(f"| no-op rerun, {n} hosts (system/model/kernel) | {v} s (control CPU "
          f"{results['control_cpu_light_by_hosts_s'][n]} s) | - |"
          for n, v in results["noop_light_by_hosts_s"].items()),
        f"| ratio 16 hosts / 1 host | {results['noop_16_vs_1_ratio']}x | <= 1.5x |",
        f"| same, control CPU only | {results['control_cpu_16_vs_1_ratio']}x | - |",
        *(f"| `pyinfra exec -- true`, {n} of the same hosts | {v} s | - |"
          for n, v in results["exec_true_light_by_hosts_s"].items()),
        f"| ratio 16 hosts / 1 host, `exec -- true` (the lab's floor) | "
        f"{results['exec_true_16_vs_1_ratio']}x | - |",
    ]
    (out / "deploy_costs.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
