"""The serve stage: the project's chat server (runtime/server.py) as a systemd service.

On each host: a dedicated unprivileged system user; runtime/ copied to <install_dir>/runtime;
/etc/chatglm/server.toml rendered from templates/server.toml.j2; an API key (from the
inventory, or generated on the host at first deploy and brought back to
<report_dir>/keys/<host>.key, mode 0600); a hardened unit from templates/chatglm-server.service.j2,
enabled at boot. The service restarts only when what it runs changed: a fingerprint of the
server code, the config, the unit, the model's files (the quantization patch and the built
kernels live there), the env's lock and the inventory's key is kept on the host, and a
different one restarts the service. After a (re)start the deploy waits for GET /health
(templates/serve_ready.py) and brings the figures back for the fleet report.
"""

import hashlib
import io
import ipaddress
import json
import os
import re
from pathlib import Path

from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation
from pyinfra.api.command import FileUploadCommand, QuoteString
from pyinfra.facts.files import Sha1File
from pyinfra.operations import files, server, systemd

from facts.serve import (CONFIG_DIR, FINGERPRINT, KEY, UNIT, UNIT_PATH, PortHolders,
                         ServeState)
from facts.smoke import ModelFiles

from .common import TEMPLATES, fail, render, text_of
from .settings import DATA, ROOT, Settings, SettingError, load_toml

CONFIG = f"{CONFIG_DIR}/server.toml"
STATE_DIR = "/var/lib/chatglm"  # the service's only writable place (its home, HF module cache)
TRITON_CACHE = f"{STATE_DIR}/triton"  # the unit's TRITON_CACHE_DIR
WARM_STAMP = f"{TRITON_CACHE}/chatglm-warm.key"
RUNTIME = ROOT / "runtime"
BACKENDS = ("auto", "engine", "stream_chat")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")


# --- settings ------------------------------------------------------------------------------------

def check_settings(s: Settings) -> None:
    """The serve settings of one host, checked before any host is touched (settings_for)."""
    if "serve" not in s.stage_list:
        return
    try:
        address = ipaddress.ip_address(s.serve_host)
    except ValueError:
        address = None
    if address is None and s.serve_host != "localhost":
        raise SettingError(s.host, "serve_host", f"= {s.serve_host!r} is not an IP address",
                           "use the address to listen on: '127.0.0.1' (this host only), "
                           "'0.0.0.0' (every interface) or one interface's address")
    if not 1 <= s.serve_port <= 65535:
        raise SettingError(s.host, "serve_port", f"= {s.serve_port} is outside 1-65535",
                           "use a free TCP port such as 8000")
    if s.serve_api_key and (len(s.serve_api_key) < 16 or any(c.isspace() for c in s.serve_api_key)):
        raise SettingError(s.host, "serve_api_key", "is shorter than 16 characters or holds spaces",
                           "use a long random key without spaces, or '' to have one generated "
                           "on the host")
    for name in ("serve_queue", "serve_max_batch", "serve_max_prompt_tokens", "serve_max_tokens",
                 "serve_ready_timeout_s"):
        if getattr(s, name) < 1:
            raise SettingError(s.host, name, f"= {getattr(s, name)} is below 1", "use a positive number")
    if s.serve_threads < 0:
        raise SettingError(s.host, "serve_threads", f"= {s.serve_threads} is negative",
                           "use 0 (torch's default: one per core) or a number of threads")
    if s.serve_drain_s < 0:
        raise SettingError(s.host, "serve_drain_s", f"= {s.serve_drain_s} is negative",
                           "use the seconds in-flight requests may finish in on a restart (30)")
    if s.serve_backend not in BACKENDS:
        raise SettingError(s.host, "serve_backend", f"= {s.serve_backend!r} is unknown",
                           f"use one of {', '.join(BACKENDS)}")
    if not USER_NAME.match(s.serve_user) or s.serve_user == "root":
        raise SettingError(s.host, "serve_user", f"= {s.serve_user!r} is not an unprivileged user name",
                           "use a system user name such as 'chatglm' (created by the deploy)")


# --- what the service runs, and its fingerprint ----------------------------------------------------

def runtime_files() -> dict[str, bytes]:
    """The server's code as it goes to the host: runtime/*.py (no caches)."""
    return {p.name: p.read_bytes() for p in sorted(RUNTIME.glob("*.py"))}


def fingerprint(parts: dict[str, str | bytes]) -> str:
    """One hash of everything the running server depends on: a different value after a
    deploy means the service must restart to run what is on the host now. Order-independent;
    each part is length-prefixed, so no two different sets of parts hash alike."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        value = value.encode() if isinstance(value, str) else value
        digest.update(f"{name}\0{len(value)}\0".encode())
        digest.update(value)
    return digest.hexdigest()[:32]


def service_parts(s: Settings, config: str, unit: str, key_sha1: str) -> dict:
    """The parts of the fingerprint known on this machine: the server code, the config, the
    unit, the env's lock and the key (only an inventory key: a generated one is made once,
    and its making restarts the service). The model's files are the host's part
    (host_fingerprint)."""
    lock = Path(s.requirements) if "/" in s.requirements else DATA / "requirements" / f"{s.requirements}.txt"
    parts = {f"runtime/{n}": b for n, b in runtime_files().items()}
    parts.update(config=config, unit=unit, key=key_sha1,
                 lock=lock.read_bytes() if lock.is_file() else s.requirements)
    return parts


def host_fingerprint(control: str, model_files: str) -> str:
    """What the host keeps after a ready (re)start: the control side's fingerprint and
    smoke.ModelFiles' hash of the model checkout (name, size, mtime of each file at its top:
    weights, quantization.py and its patch, the built CPU and GPU kernels), as the host had
    them when the service started. The model part is computed on the host when the service
    (re)starts, after this run's model and kernel operations, not from what was there when
    the run began."""
    return f"{control} {model_files}"


# --- facts -------------------------------------------------------------------------------------------

# --- operations ----------------------------------------------------------------------------------

@operation()
def check_port(s: Settings):
    """
    Fail this host, before anything is changed on it, when it cannot run the service: PID 1
    is not systemd, or serve_port is held by a program other than the chat server's unit.

    + s: the host's settings (serve_port, serve_host)
    """
    seen = host.get_fact(PortHolders, port=s.serve_port, unit=UNIT)
    if not seen["systemd"]:
        yield fail(f"serve: this host does not run systemd as PID 1, which the serve stage needs "
                   f"for {UNIT}. Fix: boot it with systemd, or leave 'serve' out of stages")
        return
    others = [h for h in seen["holders"] if not h[2]]
    if seen["listening"] and (others or not seen["holders"]):
        what = "; ".join(f"pid {pid}: {cmd}" for pid, cmd, _ in others) or "a process this check cannot see"
        yield fail(f"serve: port {s.serve_port} (setting 'serve_port') is in use by {what}. Fix: stop "
                   f"that program or set serve_port to a free port")
        return
    host.noop(f"port {s.serve_port} is free" if not seen["listening"] else
              f"port {s.serve_port} is held by {UNIT} itself")


def warm_key(bits: int, revision: str, torch: str | None, caps: list[str]) -> str:
    """What the compiled engine kernels depend on: their source, the weight width, the model
    (its shapes), the torch build (which brings Triton) and the GPU architectures."""
    digest = hashlib.sha256((RUNTIME / "kernels.py").read_bytes())
    digest.update(json.dumps([bits, revision, torch or "", sorted(caps)]).encode())
    return digest.hexdigest()


@operation()
def warm_kernels(install_dir: str, python: str, user: str, config: str, bits: int, key: str):
    """
    Compile the generation engine's Triton kernels for this host's GPU and the model's shapes
    into the service's Triton cache, so that starting the server compiles nothing (Triton
    builds each kernel, and a small launcher with gcc, on first use).

    + install_dir: where runtime/ is (the server's working directory)
    + python: the env's interpreter
    + user: the service's user, who owns the cache
    + config: the model's config.json, which gives the shapes
    + bits: 4 or 8 for int4/int8 weights, 0 for fp16 (attention kernels only)
    + key: warm_key() of this run; the kernels are built again when it changes
    """
    if (text_of(WARM_STAMP) or "").strip() == key:
        host.noop(f"the engine's kernels in {TRITON_CACHE} are built for this GPU, model and engine")
        return
    yield StringCommand("install", "-d", "-o", user, "-g", user, "-m", "700", STATE_DIR, TRITON_CACHE)
    yield StringCommand("cd", QuoteString(install_dir), "&&", "runuser", "-u", QuoteString(user), "--",
                        "env", "PYTHONDONTWRITEBYTECODE=1", f"HOME={STATE_DIR}", f"TRITON_CACHE_DIR={TRITON_CACHE}",
                        QuoteString(python), "-m", "runtime.kernels", "--warm", "--config", QuoteString(config),
                        "--bits", QuoteString(str(bits) if bits else ""))
    yield from files.put._inner(src=io.StringIO(key + "\n"), dest=WARM_STAMP, user=user, group=user,
                                mode="600")


@operation()
def install(s: Settings):
    """
    The service's user and code: a system user without a login or home of its own
    (serve_user, home STATE_DIR which systemd creates for the unit), runtime/*.py in
    <install_dir>/runtime (root's, read-only to the service).

    + s: the host's settings (serve_user, install_dir)
    """
    yield from server.user._inner(user=s.serve_user, system=True, home=STATE_DIR,
                                  shell="/usr/sbin/nologin", ensure_home=False)
    dest = f"{s.install_dir}/runtime"
    yield from files.directory._inner(path=dest, user="root", group="root", mode="755")
    for name, body in runtime_files().items():
        yield from files.put._inner(src=io.BytesIO(body), dest=f"{dest}/{name}", user="root",
                                    group="root", mode="644")


def _key_sha1(s: Settings) -> str:
    return hashlib.sha1((s.serve_api_key + "\n").encode()).hexdigest() if s.serve_api_key else ""


@operation()
def api_key(s: Settings):
    """
    The API key the server requires (Bearer) in /etc/chatglm/api.key, the service user's,
    mode 0600: serve_api_key from the inventory, or 32 random bytes made on the host when
    there is none. Never printed: not in --diff, not in a command line.

    + s: the host's settings (serve_api_key, serve_user)
    """
    seen = host.get_fact(ServeState, unit=UNIT)
    want_owner = f"{s.serve_user} 600"
    sha1, _, owner = seen["key"].partition(" ")
    if s.serve_api_key:
        if sha1 == _key_sha1(s) and owner == want_owner:
            host.noop("the inventory's API key is in place")
            return
        # Uploaded into a directory only root can enter, then moved over the key: the key is
        # never readable by anyone else, nor part of a command (pyinfra logs commands) or diff.
        private = f"{CONFIG_DIR}/.key-upload"
        yield f"install -d -m 700 -o root -g root {private}"
        yield FileUploadCommand(io.BytesIO((s.serve_api_key + "\n").encode()), f"{private}/key",
                                remote_temp_filename=f"{private}/key.tmp")
        yield (f"chown {s.serve_user}:{s.serve_user} {private}/key && chmod 600 {private}/key && "
               f"mv {private}/key {KEY} && rmdir {private}")
        return
    if sha1:
        if owner == want_owner:
            host.noop("the API key generated at the first deploy is in place")
            return
        yield f"chown {s.serve_user}:{s.serve_user} {KEY} && chmod 600 {KEY}"
        return
    # 32 bytes of the kernel's randomness as hex: one line without spaces, as the server wants.
    yield (f"umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {KEY}.new && echo >> {KEY}.new "
           f"&& chown {s.serve_user}:{s.serve_user} {KEY}.new && mv {KEY}.new {KEY}")


def _write_private(path: Path, data: bytes) -> None:
    """A file only its owner can read, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _fetch_key(state, host, remote: str, local: str):
    buffer = io.BytesIO()
    host.get_file(remote, buffer)
    _write_private(Path(local), buffer.getvalue())
    return True


@operation()
def fetch_key(s: Settings, local_path: str):
    """
    Bring the host's API key to the control machine (local_path, mode 0600, its folder 0700),
    so that clients can be given it; compared by sha1 first.

    + s: the host's settings
    + local_path: where the key goes on this machine (<report_dir>/keys/<host>.key)
    """
    remote = host.get_fact(Sha1File, path=KEY)
    local = Path(local_path)
    if remote and local.is_file() and hashlib.sha1(local.read_bytes()).hexdigest() == remote \
            and (local.stat().st_mode & 0o777) == 0o600:
        host.noop(f"{local} holds the host's API key")
        return
    yield FunctionCommand(_fetch_key, (KEY, str(local)), {})


@operation()
def config(s: Settings, variant: str, model_dir: str, revision: str, device: str):
    """
    /etc/chatglm/server.toml from templates/server.toml.j2 (readable by the service's group only).

    + s: the host's settings (serve_*)
    + variant: fp16, int8 or int4
    + model_dir: the model checkout the server loads
    + revision: the model's pinned commit, reported by /health
    + device: 'cuda' or 'cpu'
    """
    values = _template_values(s, variant, model_dir, revision, device)
    yield from files.directory._inner(path=CONFIG_DIR, user="root", group="root", mode="755")
    yield from files.put._inner(src=io.StringIO(render("server.toml.j2", **values)), dest=CONFIG,
                                user="root", group=s.serve_user, mode="640")


@operation()
def unit(s: Settings, variant: str, model_dir: str, revision: str, device: str):
    """
    The unit file from templates/chatglm-server.service.j2. An operation of its own: pyinfra
    runs an operation's body at collection only up to its first command, so a second file in
    the config operation would miss its --diff.

    + s: the host's settings (serve_*)
    + variant: fp16, int8 or int4
    + model_dir: the model checkout the server loads
    + revision: the model's pinned commit
    + device: 'cuda' or 'cpu'
    """
    text = render("chatglm-server.service.j2", **_template_values(s, variant, model_dir, revision, device))
    yield from files.put._inner(src=io.StringIO(text), dest=UNIT_PATH, user="root", group="root", mode="644")


def _template_values(s: Settings, variant: str, model_dir: str, revision: str, device: str) -> dict:
    return dict(s=s, variant=variant, model_dir=model_dir, revision=revision, device=device,
                config=CONFIG, key=KEY, state_dir=STATE_DIR)


def planned_fingerprint(s: Settings, variant: str, model_dir: str, revision: str, device: str) -> dict:
    """What this run will leave on the host: {"fingerprint", "unit_sha1"}."""
    values = _template_values(s, variant, model_dir, revision, device)
    config_text = render("server.toml.j2", **values)
    unit_text = render("chatglm-server.service.j2", **values)
    return {"fingerprint": fingerprint(service_parts(s, config_text, unit_text, _key_sha1(s))),
            "unit_sha1": hashlib.sha1(unit_text.encode()).hexdigest()}


def _stale(s: Settings, fingerprint: str, model_dir: str, changing: bool) -> bool:
    """Whether the service must (re)start: what it runs differs from what it last started
    with, an operation before it in this run changes the model or the env, or the key is
    missing (made in this run)."""
    seen = host.get_fact(ServeState, unit=UNIT)
    model_files = host.get_fact(ModelFiles, path=model_dir)
    return (changing or seen["fingerprint"] != host_fingerprint(fingerprint, model_files)
            or not seen["key"].split(" ")[0] or seen["active"] != "active")


@operation()
def service(s: Settings, fingerprint: str, unit_sha1: str, model_dir: str, changing: bool = False):
    """
    The unit enabled at boot and running; restarted only when what it runs changed (_stale);
    systemd re-reads the unit only when its file changes.

    + s: the host's settings
    + fingerprint: planned_fingerprint's value for this run
    + unit_sha1: sha1 of the unit file this run writes
    + model_dir: the model checkout the server loads
    + changing: an operation before this one in this run changes the model, its kernels or the env
    """
    seen = host.get_fact(ServeState, unit=UNIT)
    active = seen["active"] == "active"
    stale = _stale(s, fingerprint, model_dir, changing)
    if stale:
        # The server's own check of its settings, as the service's user (it must read the key):
        # a config the server refuses fails the deploy here, and the running service stays.
        yield StringCommand("cd", s.install_dir, "&&", "runuser", "-u", s.serve_user, "--", "env",
                            "PYTHONDONTWRITEBYTECODE=1", f"{s.venv}/bin/python", "-m", "runtime.server",
                            "--config", CONFIG, "--check")
    yield from systemd.service._inner(service=UNIT, running=True, enabled=True,
                                      restarted=active and stale,
                                      daemon_reload=seen["unit"] != unit_sha1)


@operation()
def ready(s: Settings, fingerprint: str, result_path: str, model_dir: str, changing: bool = False,
          chat: bool = True):
    """
    After a (re)start: wait for GET /health to answer ready (at most serve_ready_timeout_s;
    on timeout or a crash loop the host fails with the unit's journal tail), then keep the
    fingerprint and the figures (endpoint, health, seconds from unit start to ready) in
    result_path on the host. Nothing to do when the service ran this fingerprint already.

    + s: the host's settings
    + fingerprint: this run's planned fingerprint
    + result_path: the JSON file on the host the figures go to
    + model_dir: the model checkout the server loads
    + changing: an operation before this one in this run changes the model, its kernels or the env
    + chat: once ready, hold the smoke test's conversation (data/smoke.toml) with the service,
      streamed, as its clients will: time to first token and tokens/s per answer
    """
    if not _stale(s, fingerprint, model_dir, changing):
        host.noop(f"{UNIT} runs what is deployed")
        return
    script = f"{s.install_dir}/serve/ready.py"
    yield from files.directory._inner(path=f"{s.install_dir}/serve", user="root", group="root", mode="755")
    yield from files.put._inner(src=str(TEMPLATES / "serve_ready.py"), dest=script, user="root",
                                group="root", mode="644")
    talk = []
    if chat:
        queries = f"{s.install_dir}/serve/queries.json"
        text = json.dumps(load_toml("smoke.toml")["queries"], ensure_ascii=False, indent=1) + "\n"
        yield from files.put._inner(src=io.BytesIO(text.encode()), dest=queries, user="root",
                                    group="root", mode="644")
        talk = ["--chat", queries, "--key-file", KEY, "--max-tokens", str(s.smoke_max_new_tokens)]
    # Ask on loopback whatever the listening address: 0.0.0.0 and :: answer there too.
    ask = "127.0.0.1" if s.serve_host in ("0.0.0.0", "localhost") else ("::1" if s.serve_host == "::" else s.serve_host)
    url = f"http://{'[' + ask + ']' if ':' in ask else ask}:{s.serve_port}/health"
    endpoint = f"http://{'[' + s.serve_host + ']' if ':' in s.serve_host else s.serve_host}:{s.serve_port}"
    # The model's part of the fingerprint as the host has it now, after this run's changes.
    model_files = ModelFiles().command(model_dir)
    yield StringCommand("python3", script, "--url", url, "--endpoint", endpoint, "--unit", UNIT,
                        "--timeout", str(s.serve_ready_timeout_s),
                        "--fingerprint", f'"{host_fingerprint(fingerprint, "")}$({model_files})"',
                        "--fingerprint-file", FINGERPRINT, "--result", result_path, *talk)


@operation()
def fetch_result(s: Settings, result_path: str, local_dir: str):
    """
    Bring the host's serve figures back for the fleet report (<report_dir>/serve/<host>.json).

    + s: the host's settings
    + result_path: the JSON on the host
    + local_dir: the control-side folder
    """
    dest = Path(local_dir) / f"{host.name}.json"
    remote = host.get_fact(Sha1File, path=result_path)
    if remote and dest.is_file() and hashlib.sha1(dest.read_bytes()).hexdigest() == remote:
        host.noop(f"{dest} is the host's serve result")
        return
    yield FunctionCommand(_fetch_result, (result_path, str(dest)), {})


def _fetch_result(state, host, remote: str, local: str):
    buffer = io.BytesIO()
    host.get_file(remote, buffer)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    Path(local).write_bytes(buffer.getvalue())
    return True
