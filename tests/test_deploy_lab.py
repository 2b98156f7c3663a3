"""The deploy end to end over SSH on lab hosts h1 (auto -> int4 on CPU) and h2 (int8)."""

import json
import re

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LIMIT = ("--limit", "h1", "--limit", "h2")


def totals(output: str) -> dict:
    """The 'Grand total' row of pyinfra's results table."""
    line = next(l for l in output.splitlines() if l.strip().startswith("Grand total"))
    cells = line.split()[2:]
    names = ("hosts", "success", "error", "no_change")
    return {n: 0 if c == "-" else int(c) for n, c in zip(names, cells)}


def test_first_deploy_then_rerun_changes_nothing(lab):
    first = lab.deploy(*LIMIT)
    assert first.returncode == 0, first.stdout[-6000:]
    t = totals(first.stdout)
    assert t["error"] == 0 and t["success"] > 0

    # What the deploy left on the hosts, checked by hand.
    for host, repo in (("h1", "chatglm-6b-int4"), ("h2", "chatglm-6b-int8")):
        model = f"/opt/chatglm/models/{repo}"
        out = lab.ssh(host, f"head -c 40 {model}/pytorch_model.bin | od -c | head -1; "
                            f"git -C {model} rev-parse HEAD; ls {model}; "
                            f"grep -c 'chatglm-deploy: prebuilt CPU kernel' {model}/quantization.py").stdout
        assert "version https" not in out  # the pointer was replaced by the weights
        assert "quantization_kernels.so" in out or "quantization_kernels_parallel.so" in out
        assert out.strip().endswith("2")  # load_cpu_kernel() itself and its call in quantize()
        result = json.loads((ROOT / "reports" / "hosts" / f"{host}.json").read_text())
        assert result["ok"] and len(result["answers"]) == 5
        assert all(a["response"].strip() for a in result["answers"])
        # The patched quantization.py loads the prebuilt kernel: nothing compiles at load.
        log = lab.ssh(host, "cd /opt/chatglm/smoke && /opt/chatglm/venv/bin/python - <<'PY'\n"
                            "from transformers import AutoModel\n"
                            f"AutoModel.from_pretrained('{model}', trust_remote_code=True)\n"
                            "PY").stdout
        assert "No compiled kernel found" not in log

    report = (ROOT / "reports" / "fleet.md").read_text()
    assert re.search(r"\| h1 \| int4 \| cpu \|", report) and re.search(r"\| h2 \| int8 \|", report)

    second = lab.deploy(*LIMIT)
    assert second.returncode == 0, second.stdout[-4000:]
    t = totals(second.stdout)
    assert t == {"hosts": t["hosts"], "success": 0, "error": 0, "no_change": t["hosts"]}, \
        second.stdout[-3000:]


def commands_per_host(output: str) -> dict:
    """SSH commands pyinfra ran per host (its --debug log)."""
    counts = {}
    for name in re.findall(r"Running command on (h\d+):", output):
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_rerun_reads_facts_in_one_command_and_live_after_a_change(lab):
    """operations/factcache.py: a converged host costs one SSH command; once a command
    runs on a host, the facts read after it are live (a stale read would lose the new
    smoke result)."""
    converge = lab.deploy(*LIMIT)
    assert converge.returncode == 0, converge.stdout[-4000:]
    quiet = lab.deploy(*LIMIT, "--debug")
    assert quiet.returncode == 0, quiet.stdout[-4000:]
    assert commands_per_host(quiet.stdout) == {"h1": 1, "h2": 1}, quiet.stdout[-3000:]
    t = totals(quiet.stdout)
    assert t["success"] == 0 and t["no_change"] == t["hosts"]

    # h2's smoke result goes: the smoke test runs again, and the fetch after it must
    # see the new result.json (the prefetched read said it was missing).
    lab.ssh("h2", "rm /opt/chatglm/smoke/result.json")
    local = ROOT / "reports" / "hosts" / "h2.json"
    local.unlink()
    changed = lab.deploy(*LIMIT, "--debug")
    assert changed.returncode == 0, changed.stdout[-4000:]
    counts = commands_per_host(changed.stdout)
    assert counts["h1"] == 1 and counts["h2"] > 2, counts
    assert json.loads(local.read_text())["ok"]
    assert totals(changed.stdout)["success"] >= 1, changed.stdout[-3000:]

    # A list naming facts that no longer exist is skipped, not fatal.
    from lab.lab import LAB
    plans = list((LAB / "control-cache" / "fact-plans").glob("h1-*.json"))
    assert plans
    for plan in plans:
        plan.write_text('[["operations.gone", "Nothing", {}], ["operations.model", "GitHead", {"bad": 1}]]')
    again = lab.deploy(*LIMIT, "--debug")
    assert again.returncode == 0, again.stdout[-4000:]
    assert totals(again.stdout)["success"] == 0
    assert commands_per_host(lab.deploy(*LIMIT, "--debug").stdout) == {"h1": 1, "h2": 1}


def test_dry_run_on_a_fresh_host_changes_nothing(lab):
    before = lab.ssh("h3", "ls /opt 2>/dev/null; dpkg -l | wc -l").stdout
    dry = lab.deploy("--limit", "h3", "--dry", "--diff")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert "Will" in dry.stdout or "Detected changes" in dry.stdout
    assert lab.ssh("h3", "ls /opt 2>/dev/null; dpkg -l | wc -l").stdout == before
