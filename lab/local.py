"""The lab's stand-ins on this machine, for a deploy through pyinfra's @local connector on a
machine with no internet (the real H100 host): no lab hosts, only the upstreams on loopback.

    python -m lab.local up --wheels .whl [--fixtures MANIFEST] [--inventory PATH] [--data key=value ...]
    python -m lab.local down

`up` builds the fixture models (or takes the JSON that `python -m lab.fixtures.build --out DIR`
printed, --fixtures), the git remotes (lab/remotes.py) and the Seafile share
folders, turns the wheels of --wheels into a PEP 503 index, starts the Seafile stand-in,
`git daemon` and the index server on 127.0.0.1 (lab.lab.PORTS, moved by
CHATGLM_LAB_PORT_OFFSET), and writes an inventory of the one host `@local` pointed at
them. --data adds or overrides inventory data (values are JSON when they parse as JSON:
`--data venv_system_site_packages=true`). State lives in CHATGLM_LAB_DIR (default .lab/),
so `python -m lab down` stops these stand-ins too.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import lab, pyindex, remotes


def parse_data(items: list[str]) -> dict:
    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--data {item!r}: use key=value")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    return data


def inventory_data(commits: dict) -> dict:
    """The data that points a host at the stand-ins, as the lab's SSH inventory does."""
    www, git, seafile = (f"127.0.0.1:{lab.PORTS[n]}" for n in ("www", "git", "seafile"))
    return {
        "pip_index_url": f"http://{www}/pypi/simple/",
        # No conda installer or channel on loopback: a venv, torch (if the lock pins it) from here.
        "python_backend": "venv",
        "torch_index_url": f"http://{www}/pypi/simple/",
        "code_url": f"git://{git}/THUDM/ChatGLM-6B",
        "code_revision": commits["ChatGLM-6B"],
        "model_url": f"git://{git}/THUDM/{{name}}",
        "model_revisions": {v: commits[n] for v, n in
                            (("fp16", "chatglm-6b"), ("int8", "chatglm-6b-int8"),
                             ("int4", "chatglm-6b-int4"))},
        "seafile_url": f"http://{seafile}",
        "weights_cache": str(lab.LAB / "control-cache"),
        "smoke_max_new_tokens": 24,
    }


def write_inventory(path: Path, data: dict) -> Path:
    lines = ['"""Written by `python -m lab.local up`: this machine through pyinfra\'s @local',
             'connector, its upstreams on loopback (do not edit)."""', "",
             f"local = [(\"@local\", {data!r})]", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def up(wheels: Path, inventory: Path | None = None, data: dict | None = None,
       fixtures: Path | None = None) -> Path:
    """Build and start the stand-ins; return the @local inventory's path."""
    lab.LAB.mkdir(parents=True, exist_ok=True)
    state = lab.load_state()
    fixtures = json.loads(fixtures.read_text()) if fixtures else lab.ensure_fixtures()
    commits = remotes.build_remotes(lab.LAB / "git", fixtures, lab.ROOT / "lab" / "code_repo")
    share_dirs = lab.build_shares(fixtures)
    index = lab.LAB / "www" / "pypi"
    shutil.rmtree(index, ignore_errors=True)
    names = pyindex.write_index(str(wheels), str(index))
    lab.log(f"package index of {wheels}: {len(names)} projects")
    lab.start_services(state, share_dirs)
    for name, svc in lab.load_state()["services"].items():
        lab.log(f"{name} listening on 127.0.0.1:{svc['port']} (pid {svc['pid']})")
    path = inventory or lab.LAB / "local-inventory.py"
    return write_inventory(path, {**inventory_data(commits), **(data or {})})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--wheels", type=Path, required=True, help="folder of wheels for the index")
    p_up.add_argument("--fixtures", type=Path, help="JSON printed by python -m lab.fixtures.build")
    p_up.add_argument("--inventory", type=Path, help="where to write the @local inventory")
    p_up.add_argument("--data", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("down")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        print(up(args.wheels.resolve(), args.inventory, parse_data(args.data), args.fixtures))
    else:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
