"""The fleet report: every host's smoke-test figures in one Markdown page, written on
the control machine at the end of a run (and after a failure), failed hosts included."""

import json
from pathlib import Path

from pyinfra.api import BaseStateCallback


def _gb(value):
    return "-" if value is None else f"{value:.2f}"


def _s(value):
    return "-" if value is None else f"{value:.2f}"


def write(report_dir: Path, failures: dict[str, dict]) -> Path:
    """Write fleet.md and fleet.json from report_dir/hosts/*.json; return fleet.md's path."""
    results = {}
    for path in sorted((report_dir / "hosts").glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    rows = [
        "| host | variant | device | RAM (GB) | VRAM (GB) | load (s) | short answer (s) "
        "| long answer (s) | tokens/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for name, r in results.items():
        answers = r.get("answers") or []
        short = answers[0]["seconds"] if answers else None
        long = answers[-1]["seconds"] if len(answers) > 1 else None
        failed = name in failures or not r.get("ok")
        rows.append(
            f"| {name} | {r.get('variant')} | {r.get('device')} | {_gb(r.get('peak_rss_gb'))} "
            f"| {_gb(r.get('peak_vram_gb'))} | {_s(r.get('load_s'))} | {_s(short)} | {_s(long)} "
            f"| {r.get('tokens_per_s') or '-'} | {'FAILED' if failed else 'ok'} |")
        versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items() if v)
        details.append(f"### {name}\n\n- versions: {versions or '-'}")
        if r.get("gpu"):
            details.append(f"- GPU: {r['gpu']} (nvidia-smi used {_gb(r.get('smi_vram_gb'))} GB)")
        for a in answers:
            first = a["response"].strip().splitlines()[0][:80] if a["response"].strip() else ""
            details.append(f"- `{a['query']}` {a['seconds']:.2f} s, {a['tokens']} tokens "
                           f"({a['tokens_per_s']} tokens/s): {first}")
        if r.get("error"):
            details.append(f"- error: {r['error']}")
        details.append("")
    lines = ["# ChatGLM-6B fleet report", "", *rows, ""]
    if failures:
        lines += ["## Failed hosts", "", "| host | stage | error |", "|---|---|---|"]
        for name, f in sorted(failures.items()):
            error = str(f.get("error", "")).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {name} | {f.get('stage')} | {error} |")
        lines.append("")
    lines += ["## Hosts", "", *details]
    report_dir.mkdir(parents=True, exist_ok=True)
    out = report_dir / "fleet.md"
    out.write_text("\n".join(lines))
    (report_dir / "fleet.json").write_text(json.dumps(
        {"hosts": results, "failed": failures}, ensure_ascii=False, indent=1))
    return out


class FleetReport(BaseStateCallback):
    """Records which stage each failed host stopped at; writes the report as hosts finish."""

    def __init__(self, report_dir: Path, hosts: int, enabled: bool = True):
        self.report_dir = report_dir
        self.enabled = enabled
        self.remaining = hosts
        self.failures: dict[str, dict] = {}

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        names = sorted(state.get_op_meta(op_hash).names)
        self.failures.setdefault(host.name, {"stage": ", ".join(names) or op_hash, "error": ""})

    def host_connect_error(self, state, host, error):
        self.failures[host.name] = {"stage": "connect", "error": str(error)}

    def host_disconnect(self, state, host):
        self.remaining -= 1
        if self.remaining == 0 and state.is_executing and self.enabled:
            path = write(self.report_dir, self.failures)
            print(f"\n--> Fleet report: {path}\n")
