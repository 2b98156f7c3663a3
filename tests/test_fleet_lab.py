"""The smoke test and the fleet report over SSH: one CPU host per variant (h1 auto -> int4,
h2 int8, h11 fp16), then one host whose model is broken while the others finish."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports"
VARIANTS = {"h1": "int4", "h2": "int8", "h11": "fp16"}
LIMIT = [arg for h in VARIANTS for arg in ("--limit", h)]
INT8_DIR = "/opt/chatglm/models/chatglm-6b-int8"


def op_row(output: str, name: str) -> dict:
    """An operation's row of pyinfra's results table."""
    line = next(l for l in output.split("--> Results:")[-1].splitlines() if l.strip().startswith(name))
    cells = line.strip()[len(name):].split()
    return {n: 0 if c == "-" else int(c) for n, c in zip(("hosts", "success", "error", "no_change"), cells)}


@pytest.fixture(scope="module")
def fleet(lab):
    run = lab.deploy(*LIMIT)
    assert run.returncode == 0, run.stdout[-6000:]
    return run


def test_cpu_smoke_test_of_each_variant_and_the_report(lab, fleet):
    assert f"--> Fleet report: {REPORT / 'fleet.md'}" in fleet.stdout
    report = (REPORT / "fleet.md").read_text()
    for host, variant in VARIANTS.items():
        assert re.search(rf"^\| {host} \| {variant} \| cpu \| [0-9.]+ \| - \| [0-9.]+ \|.* \| ok \|$",
                         report, re.M), report
        r = json.loads((REPORT / "hosts" / f"{host}.json").read_text())
        assert r["ok"] and r["variant"] == variant and r["device"] == "cpu"
        assert [a["query"] for a in r["answers"]] == [
            "你好！", "请介绍一下你自己。", "你有哪些能力？", "请从整体介绍一下环保行业。",
            "请写一段使用python进行PCA降维可视化的代码。"]
        assert all(a["response"].strip() and a["tokens"] > 0 and a["seconds"] > 0 for a in r["answers"])
        assert r["load_s"] > 0 and r["peak_rss_gb"] > 0 and r["tokens_per_s"] > 0
        assert r["versions"]["transformers"] == "4.33.3" and r["versions"]["torch"].startswith("2.13.0")
        # The checkout is at the pinned commit, and transformers did not ask for a revision.
        head = lab.ssh(host, f"git -C {r['model_dir']} rev-parse HEAD").stdout.strip()
        assert r["model_commit"] == r["revision"] == head
        assert r["revision_warning"] is False
        assert not [w for w in r["warnings"] if "revision" in w.lower()], r["warnings"]
    assert "## Failed hosts" not in report
    assert "](fleet.svg)" in report
    svg = ET.parse(REPORT / "fleet.svg").getroot()
    hosts = [g.get("data-host") for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("data-host")]
    assert sorted(set(hosts)) == sorted(VARIANTS) and len(hosts) == 2 * len(VARIANTS)  # time + memory


def test_a_broken_model_fails_its_host_in_the_report_while_the_others_finish(lab, fleet):
    lab.ssh("h2", f"cp {INT8_DIR}/config.json /root/config.json.good && "
                  f"printf '{{\"model_type\": \"chatglm\",' > {INT8_DIR}/config.json")
    try:
        run = lab.deploy(*LIMIT)
    finally:
        lab.ssh("h2", f"mv /root/config.json.good {INT8_DIR}/config.json")
    assert run.returncode != 0
    # Only h2 failed, and only at the smoke test; h1 and h11 went through every operation.
    assert op_row(run.stdout, "Smoke | chat test") == {"hosts": 3, "success": 0, "error": 1, "no_change": 2}
    assert op_row(run.stdout, "Model | weights")["error"] == 0
    assert f"--> Fleet report: {REPORT / 'fleet.md'}" in run.stdout

    report = (REPORT / "fleet.md").read_text()
    row = re.search(r"^\| h2 \| (.*) \|$", report, re.M).group(1)
    assert "FAILED (Smoke: chat test)" in row
    failed = re.search(r"^\| h2 \| Smoke: chat test \| (.*) \|$", report, re.M)
    assert failed and "config.json" in failed.group(1) and "smoke test:" in failed.group(1), report
    for host in ("h1", "h11"):
        assert re.search(rf"^\| {host} \| {VARIANTS[host]} \| cpu \|.* \| ok \|$", report, re.M)
    fleet_json = json.loads((REPORT / "fleet.json").read_text())
    assert fleet_json["failed"]["h2"]["stage"] == "Smoke: chat test"
    assert "config.json" in fleet_json["failed"]["h2"]["error"]
    # The failed host's figures are this run's: its own result with the traceback.
    assert fleet_json["hosts"]["h2"]["ok"] is False and "Traceback" in fleet_json["hosts"]["h2"]["traceback"]
    svg = (REPORT / "fleet.svg").read_text()
    assert "FAILED at Smoke: chat test" in svg
