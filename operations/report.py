"""The fleet report: every host's smoke-test figures in one Markdown page and one chart,
written on the control machine at the end of a run (and after a failure), failed hosts
listed with the stage they stopped at and the error they stopped with."""

import json
import logging
import re
from pathlib import Path

from pyinfra.api import BaseStateCallback

from .common import render

RESULT_PREFIX = "SMOKE-RESULT "
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Chart series: (label, colour, function of a host's result).
TIME_SERIES = [
    ("load", "#4c78a8", lambda r: r.get("load_s")),
    ("short answer", "#72b7b2", lambda r: _answer(r, 0)),
    ("long answer", "#f58518", lambda r: _answer(r, -1)),
    ("all answers", "#b279a2", lambda r: round(sum(a["seconds"] for a in r["answers"]), 3)
     if r.get("answers") else None),
]
MEMORY_SERIES = [
    ("peak RAM (RSS)", "#54a24b", lambda r: r.get("peak_rss_gb")),
    ("peak VRAM (torch)", "#e45756", lambda r: r.get("peak_vram_gb")),
    ("peak VRAM (nvidia-smi)", "#ff9da6", lambda r: r.get("smi_vram_gb")),
]


def _answer(r, index):
    answers = r.get("answers") or []
    if not answers or (index == -1 and len(answers) < 2):
        return None
    return answers[index]["seconds"]


def _num(value):
    return "-" if value is None else f"{value:.2f}"


def _cell(text, limit=300) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()[:limit]


def error_text(stdout: list[str], stderr: list[str], logs: list[str] = ()) -> str:
    """The error a failed operation stopped with, from its output and the host's log lines.

    `ERROR:` lines (operations.common.fail, the smoke test) win; else the last lines of
    stderr, of stdout, or of what pyinfra logged for the host (a Python callback's error).
    """
    for lines in (stderr, stdout):
        marked = [line.strip()[len("ERROR:"):].strip() for line in lines
                  if line.strip().startswith("ERROR:")]
        if marked:
            return " / ".join(marked)
    for lines in (stderr, [line for line in stdout if not line.startswith(RESULT_PREFIX)]):
        tail = [line.strip() for line in lines if line.strip()][-3:]
        if tail:
            return " ".join(tail)
    logged = [line for line in logs if line and not re.match(r"Error(: executed \d+ commands)?$", line)]
    return " ".join(logged[-3:]) or "no output (see the pyinfra log above)"


def smoke_result(stdout: list[str]) -> dict | None:
    """The smoke test's result printed on its SMOKE-RESULT line, when a failed op has one."""
    for line in reversed(stdout):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                return None
    return None


def chart(results: dict[str, dict], failures: dict[str, dict]) -> str:
    """An SVG of per-host times and memory: one panel each, a group of bars per host."""
    width, label_w, bar_w, bar_h, gap = 900, 150, 560, 13, 10
    panels, y = [], 40
    for title, unit, series in (("Time", "s", TIME_SERIES), ("Memory", "GB", MEMORY_SERIES)):
        values = {h: [fn(r) if r else None for _, _, fn in series] for h, r in results.items()}
        top = max([v for vs in values.values() for v in vs if v] or [1])
        panel = {"title": f"{title} ({unit})", "y": y, "legend": [], "groups": []}
        for i, (name, colour, _) in enumerate(series):
            panel["legend"].append({"x": label_w + i * 170, "y": y + 18, "colour": colour, "name": name})
        y += 34
        for host in results:
            group = {"host": host, "y": y, "label_y": y + bar_h * len(series) / 2 + 4,
                     "failed": host in failures, "bars": [], "note": ""}
            for i, ((name, colour, _), value) in enumerate(zip(series, values[host])):
                w = 0 if not value else max(1.0, bar_w * value / top)
                group["bars"].append({"x": label_w, "y": y + i * bar_h, "w": round(w, 1),
                                      "h": bar_h - 2, "colour": colour, "name": name,
                                      "text": "-" if value is None else f"{value:.2f} {unit}",
                                      "text_x": label_w + w + 4, "text_y": y + i * bar_h + bar_h - 3})
            if host in failures:
                group["note"] = f"FAILED at {failures[host].get('stage')}"
            y += bar_h * len(series) + gap
            panel["groups"].append(group)
        panel["bottom"] = y - gap / 2
        panels.append(panel)
        y += 24
    return render("fleet_chart.svg.j2",
        width=width, height=y, panels=panels, label_w=label_w, bar_w=bar_w)


def write(report_dir: Path, failures: dict[str, dict], hosts: list[str] | None = None,
          confirmed: set[str] | None = None) -> Path:
    """Write fleet.md, fleet.svg and fleet.json from report_dir/hosts/*.json (the in-process smoke
    tests) and report_dir/serve/*.json (the services, and the smoke conversation of a served host
    that has no in-process result); return fleet.md.

    + failures: {host: {"stage", "error"[, "result"][, "interrupted"]}}; a failed host's own
      smoke result ("result") replaces a stale one from an earlier run; an interrupted
      host is listed as INTERRUPTED (<stage>)
    + hosts: the hosts of this run (default: every host with a result file)
    + confirmed: the hosts whose result file this run fetched or found equal to the host's
      own result (default: every file counts); any other file was left by an earlier run,
      perhaps by another machine of the same name, and is not shown
    """
    results = {}
    for path in sorted((report_dir / "hosts").glob("*.json")):
        if confirmed is not None and path.stem not in confirmed:
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    names = sorted(set(hosts) | set(failures)) if hosts is not None else sorted(set(results) | set(failures))
    serving = _serving(report_dir, names)
    rows = [
        "| host | variant | device | RAM (GB) | VRAM (GB) | load (s) | short answer (s) "
        "| long answer (s) | tokens/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    details, shown = [], {}
    for name in names:
        failed = failures.get(name)
        # A failed host's figures are this run's or none: an old result file would mislead.
        r = (failed.get("result") or {}) if failed else (results.get(name) or service_smoke(serving.get(name)))
        shown[name] = r
        answers = r.get("answers") or []
        if failed:
            status = f"{_failed_word(failed)} ({failed.get('stage')})"
        elif not r:
            status = "no smoke result"
        elif r.get("through_service"):
            status = "ok (through the service)"
        else:
            status = "ok" if r.get("ok") else "FAILED"
        rows.append(
            f"| {name} | {r.get('variant', '-')} | {r.get('device', '-')} | {_num(r.get('peak_rss_gb'))} "
            f"| {_num(r.get('peak_vram_gb'))} | {_num(r.get('load_s'))} | {_num(_answer(r, 0))} "
            f"| {_num(_answer(r, -1))} | {r.get('tokens_per_s') or '-'} | {_cell(status, 80)} |")
        details.append(f"### {name}\n")
        if failed:
            details.append(f"- **{_failed_word(failed).lower()}** at `{failed.get('stage')}`: "
                           f"{_cell(failed.get('error'), 1000)}")
        if r:
            versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items() if v)
            details.append(f"- versions: {versions or '-'}")
            if r.get("model_dir"):
                details.append(f"- model: `{r['model_dir']}` at {r.get('model_commit') or '-'} "
                               f"(pinned {r.get('revision') or '-'}); finished {r.get('finished_at', '-')}")
        if r.get("gpu"):
            details.append(f"- GPU: {r['gpu']} (sm {r.get('compute_cap', '?')}); peak VRAM "
                           f"torch {_num(r.get('peak_vram_gb'))} GB, nvidia-smi "
                           f"{_num(r.get('smi_vram_gb'))} GB ({r.get('smi_vram_source') or '-'})")
        for a in answers:
            first = a["response"].strip().splitlines()[0][:80] if a["response"].strip() else ""
            details.append(f"- `{a['query']}` {a['seconds']:.2f} s, {a['tokens']} tokens "
                           f"({a['tokens_per_s']} tokens/s): {_cell(first, 80)}")
        if "warnings" in r:  # the in-process test's; a service's warnings are in its journal
            warnings = r.get("warnings") or []
            details.append(f"- warnings: {len(warnings)}"
                           + ("; revision warning: YES" if r.get("revision_warning") else ""))
            details += [f"  - {_cell(w, 200)}" for w in warnings[:10]]
        if r.get("error"):
            details.append(f"- error: {_cell(r['error'], 1000)}")
        if r.get("traceback") and not r.get("ok"):
            details += ["", "```", r["traceback"].strip()[-1500:], "```"]
        details.append("")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "fleet.svg").write_text(chart(shown, failures))
    lines = ["# ChatGLM-6B fleet report", "", *rows, "",
             "![per-host load and answer times, peak RAM and VRAM](fleet.svg)", ""]
    if failures:
        lines += ["## Failed hosts", "", "| host | stage | error |", "|---|---|---|"]
        for name, f in sorted(failures.items()):
            stage = f"{f.get('stage')} (interrupted)" if f.get("interrupted") else f.get("stage")
            lines.append(f"| {name} | {_cell(stage, 120)} | {_cell(f.get('error'))} |")
        lines.append("")
    if serving:
        lines += ["## Serving", "",
                  "| host | endpoint | health | variant | device | model commit | unit start to ready (s) "
                  "| time to first token per answer (s) | tokens/s per answer | ready at |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in serving.items():
            h = r.get("health") or {}
            answers = r.get("answers") or []
            ttft = " / ".join(_num(a.get("ttft_s")) for a in answers) or "-"
            rate = " / ".join(str(a.get("tokens_per_s") or "-") for a in answers) or "-"
            lines.append(f"| {name} | {_cell(r.get('endpoint', '-'), 80)} | {_cell(h.get('status', '-'), 40)} "
                         f"| {h.get('variant', '-')} | {h.get('device', '-')} | {_cell(h.get('model_commit') or '-', 12)} "
                         f"| {_num(r.get('ready_s'))} | {ttft} | {rate} | {r.get('ready_at', '-')} |")
        lines.append("")
    lines += ["## Hosts", "", *details]
    out = report_dir / "fleet.md"
    out.write_text("\n".join(lines))
    (report_dir / "fleet.json").write_text(json.dumps(
        {"hosts": {n: shown[n] for n in names}, "serve": serving,
         "failed": {n: {k: v for k, v in f.items() if k != "result"} for n, f in failures.items()}},
        ensure_ascii=False, indent=1))
    return out


def service_smoke(r: dict | None) -> dict:
    """A served host's smoke figures: the conversation the deploy held with its service
    (serve/<host>.json, templates/serve_ready.py) in the shape of the in-process test's result;
    {} when there was none. Load is the server's start to ready, memory its peak."""
    answers = (r or {}).get("answers")
    if not answers:
        return {}
    h = r.get("health") or {}
    tokens, seconds = sum(a["tokens"] for a in answers), sum(a["seconds"] for a in answers)
    return {"ok": True, "through_service": True, "variant": h.get("variant"), "device": h.get("device"),
            "load_s": h.get("ready_after_s"), "peak_rss_gb": h.get("peak_rss_gb"),
            "peak_vram_gb": h.get("peak_vram_gb"), "versions": h.get("versions") or {},
            "answers": answers, "tokens_per_s": round(tokens / seconds, 2) if seconds else None}


def _serving(report_dir: Path, names: list[str]) -> dict:
    """The serve stage's figures per host (operations/serve.ready, fetched to serve/<host>.json):
    as of the service's last (re)start by the deploy."""
    found = {}
    for name in names:
        path = report_dir / "serve" / f"{name}.json"
        try:
            found[name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def _failed_word(failure: dict) -> str:
    return "INTERRUPTED" if failure.get("interrupted") else "FAILED"


class HostLog(logging.Handler):
    """pyinfra's warning and error lines per host ('[h1] ...'): the only trace of an error
    raised inside a Python callback (FunctionCommand), which leaves no command output."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: dict[str, list[str]] = {}

    def emit(self, record):
        try:
            text = ANSI.sub("", record.getMessage())
        except Exception:  # a log line must never break the run
            return
        match = re.match(r"\s*\[([^\]]+)\]\s+(?:nested\s+)?(.*)", text, re.S)
        if match:
            lines = self.lines.setdefault(match.group(1), [])
            lines.append(match.group(2).strip()[:500])
            del lines[:-20]


def _stage(state, op_hash: str) -> str:
    """An operation's name as the report shows it: "Smoke: chat test" for pyinfra's
    "Smoke | chat test" (a | would end the report's table cell)."""
    names = sorted(name.replace(" | ", ": ") for name in state.get_op_meta(op_hash).names)
    return ", ".join(names) or op_hash


class FleetReport(BaseStateCallback):
    """Records the stage and error of each failed host; writes the report after the last
    host disconnects, and prints its path."""

    def __init__(self, report_dir: Path, hosts: int, enabled: bool = True):
        self.report_dir = report_dir
        self.enabled = enabled
        self.remaining = hosts
        self.hosts: list[str] = []
        self.failures: dict[str, dict] = {}
        self._failed_ops: dict[str, tuple] = {}
        self.confirmed: set[str] = set()  # hosts whose result file is theirs, this run
        self.done: dict[str, set] = {}     # host -> op hashes completed
        self.running: dict[str, str] = {}  # host -> op hash started, not yet completed
        self.written = False
        self.log = HostLog()
        logging.getLogger("pyinfra").addHandler(self.log)

    def confirm(self, name: str):
        """The host's result file is its current result (smoke.fetch, at execution)."""
        self.confirmed.add(name)

    def operation_host_start(self, state, host, op_hash):
        self.running[host.name] = op_hash

    def operation_host_success(self, state, host, op_hash, retry_count=0):
        self.done.setdefault(host.name, set()).add(op_hash)
        self.running.pop(host.name, None)

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        self.running.pop(host.name, None)
        if host.name not in self.failures:
            self.failures[host.name] = {"stage": _stage(state, op_hash), "error": ""}
            # The op's output is stored only after this callback: read it at disconnect.
            self._failed_ops[host.name] = (host, op_hash)

    def host_connect_error(self, state, host, error):
        self.failures[host.name] = {"stage": "connect", "error": str(error)}

    def unreachable(self, name: str, reason: str):
        """A host pyinfra could not connect to before this handler was added."""
        self.failures[name] = {"stage": "connect", "error": reason}
        self.hosts.append(name)

    def _resolve(self, state, name):
        host, op_hash = self._failed_ops.pop(name)
        stdout, stderr = [], []
        try:
            meta = state.get_op_data_for_host(host, op_hash).operation_meta
            if meta.is_complete():
                stdout, stderr = meta.stdout_lines, meta.stderr_lines
        except (KeyError, AttributeError, RuntimeError):
            pass
        failure = self.failures[name]
        failure["error"] = error_text(stdout, stderr, self.log.lines.get(name, []))
        result = smoke_result(stdout)
        if result is not None:
            failure["result"] = result

    def host_disconnect(self, state, host):
        # Hosts connect before deploy.py adds this handler; every one of them disconnects.
        self.hosts.append(host.name)
        self.remaining -= 1
        if self.remaining == 0 and state.is_executing and self.enabled and not self.written:
            self._write(state)

    def _write(self, state):
        for name in list(self._failed_ops):
            self._resolve(state, name)
        path = write(self.report_dir, self.failures, self.hosts, self.confirmed)
        self.written = True
        print(f"\n--> Fleet report: {path} (chart: {path.with_suffix('.svg')})\n", flush=True)

    def interrupted(self, state, why: str):
        """The run was stopped (SIGINT, SIGTERM): every host that had not finished is
        INTERRUPTED at the operation it was in, or the next one it had to run. Writes the
        report at once (the disconnect after it may not come)."""
        if not self.enabled or self.written:
            return
        order = list(state.get_op_order()) if hasattr(state, "get_op_order") else []
        for host in state.inventory:
            name = host.name
            if not state.is_host_in_limit(host) or name in self.failures:
                continue
            if name not in self.hosts:
                self.hosts.append(name)
            mine = [h for h in order if h in state.ops.get(host, {})]
            if not state.is_executing:
                stage = "before the first operation"
            else:
                op_hash = self.running.get(name) or next(
                    (h for h in mine if h not in self.done.get(name, ())), None)
                if op_hash is None:
                    continue  # every operation of this host completed
                stage = _stage(state, op_hash)
            self.failures[name] = {"stage": stage, "error": f"the deploy was interrupted ({why})",
                                   "interrupted": True}
        self._write(state)


def stop_on_signals(state, report: "FleetReport", dry: bool) -> None:
    """SIGINT and SIGTERM stop the run with 128 + the signal's number, after the report
    marks the hosts that did not finish (pyinfra's own SIGINT handler exits 0, and SIGTERM
    would end the run without a report)."""
    import signal
    import sys

    def stop(signum, frame):
        name = signal.Signals(signum).name
        print(f"\n--> Interrupted by {name}: the hosts that had not finished are marked "
              "INTERRUPTED in the report; rerun the deploy to finish them\n", file=sys.stderr,
              flush=True)
        if not dry:
            try:
                report.interrupted(state, name)
            except Exception as error:  # the exit status must still say interrupted
                print(f"--> could not write the report: {error}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def merge(report_dir: Path, parts: dict[str, Path]) -> Path:
    """One report from the reports of several runs (say, one per variant on one @local
    host): host H of the run labelled L is listed as 'H-L'. Returns fleet.md's path."""
    failures, names = {}, []
    (report_dir / "hosts").mkdir(parents=True, exist_ok=True)
    for label, part in parts.items():
        data = json.loads((Path(part) / "fleet.json").read_text())
        for name, r in data["hosts"].items():
            new = f"{name}-{label}"
            names.append(new)
            if name in data["failed"]:
                failures[new] = {**data["failed"][name], "result": r}
            elif r:
                (report_dir / "hosts" / f"{new}.json").write_text(json.dumps(r, ensure_ascii=False))
    return write(report_dir, failures, names)


if __name__ == "__main__":
    import sys

    # python -m operations.report merge OUT_DIR LABEL=DIR [LABEL=DIR ...]
    if len(sys.argv) < 4 or sys.argv[1] != "merge":
        sys.exit("usage: python -m operations.report merge OUT_DIR LABEL=DIR [LABEL=DIR ...]")
    out = merge(Path(sys.argv[2]), dict(arg.split("=", 1) for arg in sys.argv[3:]))
    print(f"--> Fleet report: {out} (chart: {out.with_suffix('.svg')})")
