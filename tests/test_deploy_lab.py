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
        assert out.strip().endswith("1")
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


def test_dry_run_on_a_fresh_host_changes_nothing(lab):
    before = lab.ssh("h3", "ls /opt 2>/dev/null; dpkg -l | wc -l").stdout
    dry = lab.deploy("--limit", "h3", "--dry", "--diff")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert "Will" in dry.stdout or "Detected changes" in dry.stdout
    assert lab.ssh("h3", "ls /opt 2>/dev/null; dpkg -l | wc -l").stdout == before
