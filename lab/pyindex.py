"""A PEP 503 "simple" package index for lab hosts that have no internet.

    python -m lab.pyindex fill -r requirements.txt --wheels DIR --index DIR
    python -m lab.pyindex index --wheels DIR --index DIR
    python -m lab.pyindex serve --dir DIR [--port P]

fill() downloads wheels for the *target* (Debian 12 amd64, CPython 3.11), not
for this machine, so the requirements file must be a complete pinned lock:
it runs pip with --no-deps.  write_index() turns a wheel folder into a static
tree that `pip install --index-url http://host:port/simple/` understands, and
serve_static() serves that tree (or an apt repository) over HTTP.
"""

import argparse
import hashlib
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import (canonicalize_name, parse_sdist_filename,
                                 parse_wheel_filename)
    from packaging.version import Version
except ImportError:  # a bare interpreter still has pip's vendored copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags
    from pip._vendor.packaging.utils import (canonicalize_name, parse_sdist_filename,
                                             parse_wheel_filename)
    from pip._vendor.packaging.version import Version

# The CPU torch wheel is ~190 MB; a CUDA build is several GB and drags in nvidia-* wheels.
TORCH_MAX_BYTES = 500 * 1024 * 1024
DIST_SUFFIXES = (".whl", ".tar.gz", ".zip")


# ---------------------------------------------------------------- filling

def platform_tags(platform="manylinux_2_28_x86_64"):
    """All manylinux tags a host of `platform`'s glibc can run, newest first.

    pip does not expand manylinux_2_X by itself (only the legacy 2010/2014
    names), so a wheel tagged only manylinux_2_17 would be missed without this.
    """
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    top, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(top, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for minor, name in legacy.items() if minor <= top]
    return tags


def supported_tags(python_version="3.11", platform="manylinux_2_28_x86_64"):
    py = tuple(int(p) for p in python_version.split(".")[:2])
    plats = platform_tags(platform)
    return set(cpython_tags(py, platforms=plats)) | set(
        compatible_tags(py, interpreter=f"cp{py[0]}{py[1]}", platforms=plats))


def dist_info(filename):
    """(canonical name, Version, tags or None) of a wheel/sdist file name, or None."""
    try:
        if filename.endswith(".whl"):
            name, version, _build, tags = parse_wheel_filename(filename)
            return name, version, tags
        if filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
            return name, version, None
    except Exception:  # packaging raises several types for foreign names
        return None
    return None


def _pinned(req):
    """The exact version a requirement pins (`==X`, no wildcard), else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return Version(specs[0].version)
    return None


def _same_release(have, want):
    # `torch==2.13.0` must accept the local build 2.13.0+cpu, as pip does.
    return have == want or (want.local is None and Version(have.public) == want)


def _find_present(req, wheel_dir):
    want = _pinned(req)
    if want is None:
        return None
    for path in sorted(Path(wheel_dir).iterdir()):
        info = dist_info(path.name)
        if info and info[0] == canonicalize_name(req.name) and _same_release(info[1], want):
            return path
    return None


def _pick_cpu_torch(req, find_links, tags):
    """Best `+cpu` torch wheel in find_links that satisfies req and fits the target."""
    best = None
    for folder in find_links:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).glob("torch-*.whl"):
            name, version, wtags = dist_info(path.name) or (None, None, None)
            if name != "torch" or version.local != "cpu" or not (wtags & tags):
                continue
            if req.specifier.contains(version, prereleases=True) and (
                    best is None or version > best[0]):
                best = (version, path)
    return best and best[1]


def _link_or_copy(src, dst):
    dst = Path(dst)
    if dst.exists():
        if dst.stat().st_size == Path(src).stat().st_size:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # other filesystem or no permission to hard-link
        shutil.copy2(src, dst)


def check_wheels(wheel_dir):
    """Fail loudly if a CUDA torch (or its nvidia-* companions) got into wheel_dir."""
    bad = []
    for path in Path(wheel_dir).iterdir():
        info = dist_info(path.name)
        if not info:
            continue
        if info[0].startswith("nvidia-"):
            bad.append(f"{path.name}: nvidia-* wheels only come with a CUDA torch")
        elif info[0] == "torch" and path.stat().st_size > TORCH_MAX_BYTES:
            bad.append(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB, a CUDA build")
        elif info[0] == "torch" and info[1].local != "cpu":
            bad.append(f"{path.name}: not a +cpu torch build")
    if bad:
        raise RuntimeError("wrong wheels in %s (remove them):\n  %s" % (wheel_dir, "\n  ".join(bad)))


def _pip(args, pip_cmd):
    proc = subprocess.run([*pip_cmd, *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def fill(requirements_file, wheel_dir, python_version="3.11",
         platform="manylinux_2_28_x86_64", extra_find_links=("/opt/wheels",),
         pip_cmd=(sys.executable, "-m", "pip")):
    """Download wheels for every line of a pinned lock file into wheel_dir.

    Returns {"present": [...], "downloaded": [...], "from_sdist": [...], "torch": name}.
    Raises RuntimeError naming the requirements pip could not satisfy.
    """
    wheel_dir = Path(wheel_dir)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    find_links = [str(p) for p in extra_find_links if Path(p).is_dir()]
    tags = supported_tags(python_version, platform)
    before = set(os.listdir(wheel_dir))
    report = {"present": [], "downloaded": [], "from_sdist": [], "torch": None}

    todo = []  # lines pip still has to resolve
    for raw in Path(requirements_file).read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            todo.append(line)  # pip options (--index-url ...) or URLs: pip's business
            continue
        if canonicalize_name(req.name) == "torch":
            # Never let pip choose: PyPI's torch is the multi-GB CUDA build.
            wheel = _pick_cpu_torch(req, [wheel_dir, *find_links], tags)
            if wheel is None:
                raise RuntimeError(
                    f"no +cpu torch wheel for {line!r} fitting CPython {python_version} "
                    f"{platform} in {list(extra_find_links)}; refusing to let pip "
                    "fetch the CUDA build from PyPI")
            _link_or_copy(wheel, wheel_dir / wheel.name)
            report["torch"] = wheel.name
            continue
        present = _find_present(req, wheel_dir)
        if present:
            report["present"].append(present.name)
        else:
            todo.append(line)

    if todo:
        base = ["download", "--no-deps", "-d", str(wheel_dir),
                "--python-version", python_version, "--implementation", "cp"]
        for tag in platform_tags(platform):
            base += ["--platform", tag]
        for folder in find_links:
            base += ["--find-links", folder]
        failed = _download(todo, base, pip_cmd)
        for line in failed:
            report["from_sdist"].append(_wheel_from_sdist(line, wheel_dir, find_links, pip_cmd))

    check_wheels(wheel_dir)
    report["downloaded"] = sorted(set(os.listdir(wheel_dir)) - before)
    return report


def _download(lines, base, pip_cmd):
    """Binary-only download of lines; returns the lines that have no fitting wheel."""
    options = [line for line in lines if line.startswith("-")]

    def run(reqs):
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
            req.write("\n".join(options + reqs) + "\n")
            req.flush()
            return _pip([*base, "--only-binary=:all:", "-r", req.name], pip_cmd)[0] == 0

    reqs = [line for line in lines if not line.startswith("-")]
    if run(reqs):
        return []
    return [line for line in reqs if not run([line])]  # one bad line fails the batch


def _wheel_from_sdist(line, wheel_dir, find_links, pip_cmd):
    """Build a pure wheel from the sdist, so the offline host needs no build tools."""
    links = [arg for folder in find_links for arg in ("--find-links", folder)]
    with tempfile.TemporaryDirectory() as tmp:
        code, out = _pip(["wheel", "--no-deps", "--no-binary=:all:", "-w", tmp, *links, line],
                         pip_cmd)
        built = [p for p in Path(tmp).glob("*.whl")]
        if code != 0 or len(built) != 1:
            raise RuntimeError(f"no wheel and no buildable sdist for {line!r}:\n{out[-3000:]}")
        tags = dist_info(built[0].name)[2]
        if any(t.abi != "none" or t.platform != "any" for t in tags):
            raise RuntimeError(f"{line!r} has no wheel for the target and its sdist "
                               f"builds a non-pure wheel {built[0].name}")
        shutil.move(str(built[0]), wheel_dir / built[0].name)
        return built[0].name


# ---------------------------------------------------------------- index

def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _requires_python(path):
    if not path.name.endswith(".whl"):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            meta = next(n for n in zf.namelist()
                        if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            for line in zf.read(meta).decode("utf-8", "replace").splitlines():
                if not line:
                    break  # end of the header block
                if line.lower().startswith("requires-python:"):
                    return line.split(":", 1)[1].strip()
    except (zipfile.BadZipFile, StopIteration, OSError):
        pass
    return None


def _page(title, links):
    body = "\n".join(links)
    return (f'<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
            f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n")


def write_index(wheel_dir, index_dir):
    """Write index_dir/simple/... (PEP 503) and index_dir/files/ from wheel_dir."""
    wheel_dir, index_dir = Path(wheel_dir), Path(index_dir)
    files_dir, simple_dir = index_dir / "files", index_dir / "simple"
    files_dir.mkdir(parents=True, exist_ok=True)
    projects = {}
    for path in sorted(wheel_dir.iterdir()):
        info = dist_info(path.name) if path.name.endswith(DIST_SUFFIXES) else None
        if info:
            _link_or_copy(path, files_dir / path.name)
            projects.setdefault(info[0], []).append(path)
    keep = {p.name for paths in projects.values() for p in paths}
    for stale in files_dir.iterdir():
        if stale.name not in keep:
            stale.unlink()
    if simple_dir.exists():
        shutil.rmtree(simple_dir)  # rebuilt whole, so removed projects vanish
    simple_dir.mkdir()
    for name, paths in sorted(projects.items()):
        links = []
        for path in paths:
            attrs = f'href="../../files/{quote(path.name)}#sha256={_sha256(path)}"'
            requires = _requires_python(path)
            if requires:
                attrs += f' data-requires-python="{html.escape(requires)}"'
            links.append(f"<a {attrs}>{html.escape(path.name)}</a><br>")
        (simple_dir / name).mkdir()
        (simple_dir / name / "index.html").write_text(_page(f"Links for {name}", links))
    root = [f'<a href="{quote(n)}/">{html.escape(n)}</a><br>' for n in sorted(projects)]
    (simple_dir / "index.html").write_text(_page("Simple index", root))
    return sorted(projects)


# ---------------------------------------------------------------- serving

class LabHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on 127.0.0.1 that runs in a thread and stops cleanly.

    stop() also shuts the sockets of open keep-alive connections, so that no
    handler thread outlives it (server_close() then joins them all).
    """

    daemon_threads = False  # so that server_close() joins the handler threads

    def __init__(self, handler, port=0):
        super().__init__(("127.0.0.1", port), handler)
        self._conns, self._conns_lock, self._thread = set(), threading.Lock(), None

    @property
    def port(self):
        return self.server_address[1]

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True,
                                        name=f"{type(self).__name__}:{self.port}")
        self._thread.start()
        return self

    def stop(self):
        if self._thread:
            self.shutdown()
            self._thread.join()
            self._thread = None
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()


class _StaticHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: pip and apt fetch many files

    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=server.directory)

    def log_request(self, code="-", size="-"):
        self.server.hits.append((self.command, self.path, int(getattr(code, "value", code))))
        if self.server.verbose:
            super().log_request(code, size)


class StaticServer(LabHTTPServer):
    def __init__(self, directory, port=0, verbose=False):
        self.directory, self.verbose, self.hits = str(directory), verbose, []
        super().__init__(_StaticHandler, port)


def serve_static(directory, port=0, verbose=False):
    """Serve directory read-only on 127.0.0.1:port (0 = any free port).

    Returns the running server: .url, .port, .hits [(method, path, status)], .stop().
    A folder answers with its index.html, which is all PEP 503 and apt need.
    """
    return StaticServer(directory, port, verbose).start()


def wait_for_signal(server, pidfile=None):
    """Block until SIGTERM/SIGINT, then stop server (and remove pidfile)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    if pidfile:
        Path(pidfile).write_text(f"{os.getpid()}\n")
    print(server.port, flush=True)  # callers that passed port 0 read this line
    try:
        while not done.wait(1):
            pass
    finally:
        server.stop()
        if pidfile:
            Path(pidfile).unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.pyindex", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fill = sub.add_parser("fill", help="download wheels for a pinned lock, then write the index")
    p_fill.add_argument("-r", "--requirements", required=True)
    p_fill.add_argument("--wheels", required=True)
    p_fill.add_argument("--index", required=True)
    p_fill.add_argument("--python-version", default="3.11")
    p_fill.add_argument("--platform", default="manylinux_2_28_x86_64")
    p_fill.add_argument("--find-links", action="append", default=None,
                        help="folder of local wheels (default /opt/wheels); repeatable")
    p_index = sub.add_parser("index", help="only (re)write the index from a wheel folder")
    p_index.add_argument("--wheels", required=True)
    p_index.add_argument("--index", required=True)
    p_serve = sub.add_parser("serve", help="serve a folder (index or apt repo) on 127.0.0.1")
    p_serve.add_argument("--dir", required=True)
    p_serve.add_argument("--port", type=int, default=0)
    p_serve.add_argument("--pidfile")
    p_serve.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.cmd == "fill":
        report = fill(args.requirements, args.wheels, args.python_version, args.platform,
                      tuple(args.find_links or ("/opt/wheels",)))
        for key in ("present", "downloaded", "from_sdist"):
            print(f"{key}: {' '.join(report[key]) or '-'}")
        print(f"torch: {report['torch'] or '-'}")
    if args.cmd in ("fill", "index"):
        names = write_index(args.wheels, args.index)
        print(f"index: {len(names)} projects in {args.index}/simple/")
    elif args.cmd == "serve":
        wait_for_signal(serve_static(args.dir, args.port, args.verbose), args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
