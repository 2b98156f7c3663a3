"""What a deploy costs: no-op reruns against bare pyinfra, scaling with hosts, stage times.

    .venv/bin/python bench/deploy_costs.py

Runs its own lab (.lab-bench, port offset 900) so it does not disturb a running one:
 1. 4 hosts, full deploy; then 5 no-op reruns, each followed by `pyinfra exec -- true` on
    the same hosts: the median of the 5 ratios (target: <= 2.0x), and the SSH commands a
    no-op rerun costs a host.
 2. 16 hosts with the system/model/kernel stages (a full deploy's torch install x16 does
    not fit this 2-core machine); 9 rounds, each running a no-op rerun on 1, 4, 8 and 16
    of them and `exec -- true` on 1 and 16, in a new order each round: the median of the
    rounds' 16/1 ratios (target: <= 1.5x), the median times, the control process's CPU
    time. The lab's hosts share the control machine's 2 cores, so what bare pyinfra gains
    per host here is the floor of this figure.
 3. Per-stage times of the first full deploy on one host (from 1's run of h1).
Preparation runs (not measured) converge the hosts and record each host's fact list
(operations/factcache.py), as any earlier run of the deploy does.
Results: bench/results/deploy_costs.{json,md}.
"""

import json
import os
import random
import re
import statistics

from labrun import ROOT, own_lab, prepare, pyinfra

lab = own_lab(".lab-bench", 900)

LIGHT = {"stages": "system,model,kernel"}
RUNS = 5
ROUNDS = 9


def commands_per_host(inventory, hosts):
    """SSH commands pyinfra runs per host in one no-op rerun (from its --debug log)."""
    out = pyinfra(inventory, "deploy.py", *limit(hosts), "--debug")[1]
    counts = [len(re.findall(rf"Running command on {h}:", out)) for h in hosts]
    return statistics.median(counts)


def limit(hosts):
    return [a for h in hosts for a in ("--limit", h)]


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
            stage = name.split(" | ")[0]
            stages[stage] = round(stages.get(stage, 0) + (end - start), 2)
        results["first_deploy_one_host_s"] = round(first, 1)
        results["stage_seconds"] = stages

        prepare(inventory, "deploy.py", *limit(full[1:]))
        prepare(inventory, "deploy.py", *limit(full))  # records each host's fact list
        results["ssh_commands_per_host_noop"] = commands_per_host(inventory, full)
        pairs = [(pyinfra(inventory, "deploy.py", *limit(full))[0],
                  pyinfra(inventory, "exec", *limit(full), "--", "true")[0]) for _ in range(RUNS)]
        results["noop_4_hosts_s"] = round(statistics.median(p[0] for p in pairs), 2)
        results["exec_true_4_hosts_s"] = round(statistics.median(p[1] for p in pairs), 2)
        results["noop_vs_exec_ratio"] = round(statistics.median(p[0] / p[1] for p in pairs), 2)

        prepare(inventory, "deploy.py", *limit(light))
        prepare(inventory, "deploy.py", *limit(light))
        # Rounds, each running every measurement once in a new order (seeded): the speed of
        # this shared machine drifts by 10-20% over minutes, which would fall on whichever
        # host count ran then if each were measured in a block.
        runs = {("deploy", n): [] for n in (1, 4, 8, 16)}
        runs.update({("exec", n): [] for n in (1, 16)})
        shuffle = random.Random(16).shuffle
        for _ in range(ROUNDS):
            order = list(runs)
            shuffle(order)
            for kind, n in order:
                args = (("deploy.py", *limit(light[:n])) if kind == "deploy" else
                        ("exec", *limit(light[:n]), "--", "true"))
                runs[kind, n].append(pyinfra(inventory, *args, cpu=True))
        med = statistics.median
        results["rounds"] = ROUNDS
        results["noop_light_by_hosts_s"] = {n: round(med(r[0] for r in runs["deploy", n]), 2)
                                            for n in (1, 4, 8, 16)}
        results["control_cpu_light_by_hosts_s"] = {n: round(med(r[2] for r in runs["deploy", n]), 2)
                                                   for n in (1, 4, 8, 16)}
        results["exec_true_light_by_hosts_s"] = {n: round(med(r[0] for r in runs["exec", n]), 2)
                                                 for n in (1, 16)}

        def ratio(kind, part=0):
            per_round = [b[part] / a[part] for a, b in zip(runs[kind, 1], runs[kind, 16])]
            return round(med(per_round), 2), round(min(per_round), 2), round(max(per_round), 2)

        results["noop_16_vs_1_ratio"], *results["noop_16_vs_1_range"] = ratio("deploy")
        results["control_cpu_16_vs_1_ratio"] = ratio("deploy", 2)[0]
        results["exec_true_16_vs_1_ratio"] = ratio("exec")[0]
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
        f"| ratio 16 hosts / 1 host (median of {results['rounds']} rounds' ratios; lowest-highest) | "
        f"{results['noop_16_vs_1_ratio']}x ({results['noop_16_vs_1_range'][0]}-"
        f"{results['noop_16_vs_1_range'][1]}) | <= 1.5x |",
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
