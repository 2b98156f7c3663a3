"""The smoke-test script and the fleet report on the control side, without lab hosts: the
rendered script run for real on a fixture model, the report from results and failures,
and the callback that finds a failed host's stage and error in pyinfra's state."""

import functools
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
from pyinfra.api.operation import OperationMeta
from pyinfra.connectors.util import CommandOutput, OutputLine

from facts import smoke as smoke_facts
from operations import report, smoke
from operations.settings import ROOT, Settings, load_toml

SVG = "{http://www.w3.org/2000/svg}"


def render(model_dir, revision, device="cpu", max_new_tokens=12):
    template = jinja2.Template(smoke.TEMPLATE.read_text())
    return template.render(model_dir=str(model_dir), revision=revision, device=device,
                           queries=load_toml("smoke.toml")["queries"], variant="fp16", key="k1",
                           max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def fp16_checkout(tmp_path_factory):
    """The fp16 fixture model as a git checkout, as the deploy leaves it on a host."""
    from lab.lab import ensure_fixtures

    src = Path(ensure_fixtures()["fp16"]["dir"])
    dest = tmp_path_factory.mktemp("model") / "chatglm-6b"
    shutil.copytree(src, dest)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": "/dev/null"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "fixture"]):
        subprocess.run(["git", *args], cwd=dest, env=env, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout
    return dest, head.strip()


def run_script(tmp_path, source):
    script = tmp_path / "smoke_test.py"
    script.write_text(source)
    # Its own HF cache: transformers copies the remote code there.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "result.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    return proc, json.loads((tmp_path / "result.json").read_text())


def test_smoke_script_chats_on_cpu_and_records_everything(tmp_path, fp16_checkout):
    model_dir, head = fp16_checkout
    proc, r = run_script(tmp_path, render(model_dir, head))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["ok"] and r["model_commit"] == head == r["revision"]
    assert len(r["answers"]) == 5 and all(a["response"].strip() for a in r["answers"])
    assert all(a["tokens"] > 0 and a["seconds"] > 0 and a["tokens_per_s"] > 0 for a in r["answers"])
    assert r["load_s"] > 0 and r["peak_rss_gb"] > 0.05 and r["tokens_per_s"] > 0
    assert set(r["versions"]) >= {"python", "torch", "cuda", "transformers"}
    assert "peak_vram_gb" not in r  # CPU run
    assert r["revision_warning"] is False and isinstance(r["warnings"], list)
    printed = [l for l in proc.stdout.splitlines() if l.startswith(report.RESULT_PREFIX)]
    assert report.smoke_result(printed) == r
    assert not (tmp_path / "result.json.tmp").exists()


def test_smoke_script_refuses_a_checkout_off_its_pin(tmp_path, fp16_checkout):
    model_dir, head = fp16_checkout
    other = "0" * 40
    proc, r = run_script(tmp_path, render(model_dir, other))
    assert proc.returncode == 1
    assert not r["ok"] and f"not at the pinned revision {other}" in r["error"]
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: smoke test: RuntimeError:")
    assert report.error_text(proc.stdout.splitlines(), proc.stderr.splitlines()) \
        == "smoke test: " + r["error"]


def test_smoke_script_records_warnings_and_a_revision_warning(tmp_path, fp16_checkout):
    model_dir, head = fp16_checkout
    source = render(model_dir, head).replace(
        "    start = time.perf_counter()\n    tokenizer",
        "    transformers.logging.get_logger('transformers.dynamic_module_utils').warning("
        "'To avoid downloading new versions of the code file, you can pin a revision.')\n"
        "    start = time.perf_counter()\n    tokenizer", 1)
    proc, r = run_script(tmp_path, source)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["revision_warning"] is True
    assert any("pin a revision" in w for w in r["warnings"])


def test_model_files_fact_changes_when_a_model_file_changes(tmp_path):
    fact = smoke_facts.ModelFiles()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".git").mkdir()

    def fingerprint():
        out = subprocess.run(["sh", "-c", fact.command(str(tmp_path))], capture_output=True, text=True)
        return fact.process(out.stdout.splitlines())

    first = fingerprint()
    assert len(first) == 16 and fingerprint() == first
    (tmp_path / ".git" / "index").write_text("x")  # git's own files do not count
    assert fingerprint() == first
    os.utime(tmp_path / "config.json", (1, 1))
    assert fingerprint() != first
    missing = subprocess.run(["sh", "-c", fact.command(str(tmp_path / "nope"))], capture_output=True,
                             text=True)
    assert fact.process(missing.stdout.splitlines()) == ""
    s = Settings(host="h")
    key = functools.partial(smoke.smoke_key, s.requirements, s.smoke_max_new_tokens, "int4", "a" * 40, "cpu")
    assert key("x") != key("y")


def test_error_text_prefers_error_lines_then_output_then_logs():
    assert report.error_text([], ["noise", "ERROR: weights: 403", "more"]) == "weights: 403"
    assert report.error_text(["ERROR: a"], ["ERROR: b"]) == "b"
    assert report.error_text(["x", "last out"], ["", "E: Unable to locate package foo", ""]) \
        == "E: Unable to locate package foo"
    assert report.error_text(["one", "two", "three", "four", "SMOKE-RESULT {}"], []) == "two three four"
    assert report.error_text([], [], ["Error: executed 1 commands", "weights: share said 403"]) \
        == "weights: share said 403"
    assert report.error_text([], [], []).startswith("no output")


def _result(variant, load, rss, short=0.5, long=2.0, ok=True, **extra):
    answers = [{"query": "你好！", "seconds": short, "tokens": 4, "tokens_per_s": 8.0, "response": "你好"},
               {"query": "pca", "seconds": long, "tokens": 40, "tokens_per_s": 20.0, "response": "import x"}]
    return {"variant": variant, "device": "cpu", "ok": ok, "load_s": load, "peak_rss_gb": rss,
            "answers": answers, "tokens_per_s": 18.0, "versions": {"torch": "2.13.0"},
            "model_dir": f"/opt/chatglm/models/{variant}", "revision": "a" * 40, "model_commit": "a" * 40,
            "warnings": [], "revision_warning": False, **extra}


def test_report_table_failures_details_and_chart(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "a.json").write_text(json.dumps(_result("int4", 1.5, 0.3)))
    (hosts / "g.json").write_text(json.dumps(_result(
        "fp16", 12.0, 3.1, device="cuda", peak_vram_gb=12.4, smi_vram_gb=13.0, smi_vram_source="process",
        gpu="NVIDIA H100 80GB HBM3", compute_cap="9.0")))
    (hosts / "b.json").write_text(json.dumps(_result("int8", 9.9, 9.9)))  # stale: b fails this run
    (hosts / "old.json").write_text(json.dumps(_result("int8", 1, 1)))  # not in this run
    failures = {
        "b": {"stage": "Smoke: chat test", "error": "smoke test: OSError: bad | <config>",
              "result": _result("int8", 0.4, 0.2, ok=False, error="OSError: bad", traceback="Traceback\nOSError")},
        "c": {"stage": "Weights: from the share", "error": "sha256 differs"},
    }
    out = report.write(tmp_path, failures, ["a", "b", "c", "g"])
    md = out.read_text()
    assert "| a | int4 | cpu | 0.30 | - | 1.50 | 0.50 | 2.00 | 18.0 | ok |" in md
    assert "| g | fp16 | cuda | 3.10 | 12.40 | 12.00 |" in md
    assert "| b | int8 | cpu | 0.20 | - | 0.40 |" in md and "FAILED (Smoke: chat test) |" in md
    assert "| c | - | - |" in md and "old" not in md
    assert "| b | Smoke: chat test | smoke test: OSError: bad \\| <config> |" in md
    assert "| c | Weights: from the share | sha256 differs |" in md
    assert "NVIDIA H100 80GB HBM3 (sm 9.0)" in md and "nvidia-smi 13.00 GB (process)" in md
    assert "Traceback\nOSError" in md
    assert "![per-host load and answer times, peak RAM and VRAM](fleet.svg)" in md
    data = json.loads((tmp_path / "fleet.json").read_text())
    assert sorted(data["hosts"]) == ["a", "b", "c", "g"] and "result" not in data["failed"]["b"]

    svg = ET.parse(tmp_path / "fleet.svg").getroot()
    groups = [g for g in svg.iter(f"{SVG}g") if g.get("data-host")]
    assert [g.get("data-host") for g in groups] == ["a", "b", "c", "g"] * 2
    widths = {(g.get("data-host"), r.get("data-series")): float(r.get("width"))
              for g in groups for r in g.iter(f"{SVG}rect")}
    assert widths[("g", "load")] > widths[("a", "load")] > 0 and widths[("c", "load")] == 0
    assert widths[("g", "peak VRAM (torch)")] > 0 and widths[("a", "peak VRAM (torch)")] == 0
    text = "".join(svg.itertext())
    assert "FAILED at Smoke: chat test" in text and "12.40 GB" in text


def test_a_served_host_reports_its_smoke_conversation_through_the_service(tmp_path):
    """With the serve stage on, the smoke test is the conversation with the service: the row of
    the table and the details come from serve/<host>.json, beside the Serving table."""
    (tmp_path / "serve").mkdir()
    (tmp_path / "hosts").mkdir()
    answers = [{"query": "你好！", "response": "你好", "tokens": 4, "ttft_s": 0.02, "seconds": 0.5,
                "tokens_per_s": 8.0},
               {"query": "pca", "response": "import x", "tokens": 40, "ttft_s": 0.05, "seconds": 2.0,
                "tokens_per_s": 20.0}]
    health = {"status": "ready", "variant": "int4", "device": "cpu", "model_commit": "c" * 40, "ready_after_s": 3.5,
              "peak_rss_gb": 0.8, "peak_vram_gb": None, "versions": {"torch": "2.13.0", "transformers": "4.30.2"}}
    (tmp_path / "serve" / "s.json").write_text(json.dumps(
        {"endpoint": "http://127.0.0.1:8000", "health": health, "ready_s": 4.2, "ready_at": "2026-12-05T06:00:00Z",
         "answers": answers}))
    # An in-process result of an earlier run, not confirmed by this one: not shown.
    (tmp_path / "hosts" / "s.json").write_text(json.dumps(_result("int4", 99.0, 9.9)))
    md = report.write(tmp_path, {}, ["s"], confirmed=set()).read_text()
    assert "| s | int4 | cpu | 0.80 | - | 3.50 | 0.50 | 2.00 | 17.6 | ok (through the service) |" in md
    assert "| s | http://127.0.0.1:8000 | ready | int4 | cpu | cccccccccccc | 4.20 | 0.02 / 0.05 | 8.0 / 20.0 |" in md
    assert "torch 2.13.0, transformers 4.30.2" in md and "`pca` 2.00 s, 40 tokens (20.0 tokens/s)" in md
    assert "warnings:" not in md and "99.00" not in md
    # Without answers (the conversation was off), the row says so rather than inventing figures.
    (tmp_path / "serve" / "s.json").write_text(json.dumps({"endpoint": "http://127.0.0.1:8000", "health": health}))
    assert "| s | - | - |" in report.write(tmp_path, {}, ["s"], confirmed=set()).read_text()


def _state(op_names, meta):
    return SimpleNamespace(
        is_executing=True,
        get_op_meta=lambda op_hash: SimpleNamespace(names={op_names}),
        get_op_data_for_host=lambda host, op_hash: SimpleNamespace(operation_meta=meta))


def test_fleet_report_callback_finds_stage_error_and_result(tmp_path, capsys):
    result = _result("int4", 0.3, 0.2, ok=False, error="RuntimeError: boom")
    meta = OperationMeta("op1", None)
    callback = report.FleetReport(tmp_path, hosts=2)
    state = _state("Smoke: chat test", meta)
    h1, h2 = SimpleNamespace(name="h1"), SimpleNamespace(name="h2")
    callback.operation_host_error(state, h1, "op1")
    # pyinfra stores the op's output after the error callback, before hosts disconnect.
    meta.set_complete(False, ["cmd"], CommandOutput([
        OutputLine("stdout", report.RESULT_PREFIX + json.dumps(result)),
        OutputLine("stderr", "Traceback (most recent call last):"),
        OutputLine("stderr", "ERROR: smoke test: RuntimeError: boom")]))
    callback.host_disconnect(state, h1)
    assert not (tmp_path / "fleet.md").exists()
    callback.host_disconnect(state, h2)
    md = (tmp_path / "fleet.md").read_text()
    assert "| h1 | Smoke: chat test | smoke test: RuntimeError: boom |" in md
    assert "| h1 | int4 | cpu | 0.20 |" in md and "| h2 | - |" in md
    assert f"--> Fleet report: {tmp_path / 'fleet.md'}" in capsys.readouterr().out


def test_host_log_keeps_each_hosts_warnings_and_errors():
    import logging

    log = report.HostLog()
    logger = logging.getLogger("pyinfra.test_smoke_report")
    logger.addHandler(log)
    try:
        logger.error("\x1b[0m[\x1b[1mh3\x1b[0m]   \x1b[31mweights: share answered 403\x1b[0m")
        logger.info("[h3] noop: nothing")
        logger.warning("[h4] nested Error in nested operation")
    finally:
        logger.removeHandler(log)
    assert log.lines == {"h3": ["weights: share answered 403"], "h4": ["Error in nested operation"]}


def test_templates_exist_where_the_operations_look():
    assert smoke.TEMPLATE.exists() and (ROOT / "templates" / "fleet_chart.svg.j2").exists()


def test_merge_lists_each_run_of_one_host_as_its_own_row(tmp_path):
    """tools/h100_full_deploy.sh: fp16 then int4 on @local, one report for both."""
    for variant, failures in (("fp16", {}), ("int4", {"@local": {"stage": "Smoke: chat test",
                                                                   "error": "smoke test: RuntimeError: no kernel"}})):
        part = tmp_path / f"h100-{variant}"
        (part / "hosts").mkdir(parents=True)
        result = _result(variant, 2.0, 1.0, ok=not failures, device="cuda")
        if failures:
            failures["@local"]["result"] = result
        else:
            (part / "hosts" / "@local.json").write_text(json.dumps(result))
        report.write(part, failures, ["@local"])
    out = report.merge(tmp_path / "all", {"fp16": tmp_path / "h100-fp16", "int4": tmp_path / "h100-int4"})
    md = out.read_text()
    assert "| @local-fp16 | fp16 | cuda | 1.00 |" in md and md.count("| ok |") == 1
    assert "| @local-int4 | int4 | cuda | 1.00 |" in md
    assert "| @local-int4 | Smoke: chat test | smoke test: RuntimeError: no kernel |" in md
    assert (tmp_path / "all" / "fleet.svg").exists()
    cli = subprocess.run([sys.executable, "-m", "operations.report", "merge", str(tmp_path / "cli"),
                          f"fp16={tmp_path / 'h100-fp16'}"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0 and "Fleet report:" in cli.stdout
    assert "| @local-fp16 | fp16 |" in (tmp_path / "cli" / "fleet.md").read_text()
