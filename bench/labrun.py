"""What the lab benches share: a lab of their own, and pyinfra runs against it."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


def own_lab(name: str, port_offset: int):
    """lab.lab bound to ROOT/<name> and its own ports, so that a lab already running (the
    tests', the demo's) is left alone. Call it before anything imports lab."""
    os.environ.setdefault("CHATGLM_LAB_DIR", str(ROOT / name))
    os.environ.setdefault("CHATGLM_LAB_PORT_OFFSET", str(port_offset))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lab import lab
    return lab


def pyinfra(inventory, *args, env=None, cpu=False):
    """(wall seconds, output) of `pyinfra -y inventory *args`; with cpu=True also the
    control process's CPU seconds (user + system). A failed run ends the bench."""
    before = os.times()
    t = time.perf_counter()
    proc = subprocess.run([PYINFRA, "-y", str(inventory), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - t
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"pyinfra {Path(inventory).name} {' '.join(args)} failed:\n"
                         f"{proc.stdout[-3000:]}")
    used = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return (elapsed, proc.stdout, used) if cpu else (elapsed, proc.stdout)


def prepare(inventory, *args):
    """A preparation run (not measured): run again once if a host hiccuped (the lab's git
    daemon once reset a connection under 16 parallel clones)."""
    try:
        pyinfra(inventory, *args)
    except SystemExit as first:
        print(f"preparation failed once, rerunning: {str(first)[-300:]}", flush=True)
        pyinfra(inventory, *args)
