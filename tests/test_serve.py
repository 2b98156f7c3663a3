"""The serve stage's pieces without a host: settings checks, the fingerprint, the templates."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from facts import serve as serve_facts
from operations import serve
from operations.checks import settings_for
from operations.settings import SettingError

ROOT = Path(__file__).resolve().parent.parent


class FakeHost:
    def __init__(self, **data):
        self.name = "h1"
        self.data = data


def error_of(**data) -> str:
    with pytest.raises(SettingError) as info:
        settings_for(FakeHost(**data))
    return str(info.value)


def test_defaults_pass_and_serve_is_a_default_stage():
    s = settings_for(FakeHost())
    assert "serve" in s.stage_list and (s.serve_host, s.serve_port, s.serve_api_key) == ("127.0.0.1", 8000, "")


@pytest.mark.parametrize("data, setting, words", [
    ({"serve_port": 0}, "serve_port", "outside 1-65535"),
    ({"serve_port": 65536}, "serve_port", "outside 1-65535"),
    ({"serve_port": "8000"}, "serve_port", "not a number"),
    ({"serve_host": "gpu-01.example"}, "serve_host", "not an IP address"),
    ({"serve_api_key": "short"}, "serve_api_key", "shorter than 16"),
    ({"serve_api_key": "a key with spaces in it"}, "serve_api_key", "spaces"),
    ({"serve_backend": "vllm"}, "serve_backend", "unknown"),
    ({"serve_user": "root"}, "serve_user", "unprivileged"),
    ({"serve_queue": 0}, "serve_queue", "below 1"),
    ({"serve_drain_s": -1}, "serve_drain_s", "negative"),
    ({"stages": "system,python,serve"}, "stages", "without 'model'"),
    ({"serve_prot": 8001}, "serve_prot", "did you mean 'serve_port'"),
])
def test_bad_serve_settings_name_host_setting_and_fix(data, setting, words):
    message = error_of(**data)
    assert f"host 'h1': setting '{setting}'" in message and words in message and "Fix:" in message, message


def test_a_non_loopback_address_needs_no_key_setting():
    """Every address gets a key (the inventory's or one generated on the host), so listening
    on every interface is accepted without serve_api_key."""
    s = settings_for(FakeHost(serve_host="0.0.0.0"))
    assert s.serve_host == "0.0.0.0" and s.serve_api_key == ""
    # Serving off: its settings are not looked at.
    settings_for(FakeHost(stages="system,python", serve_port=0))


def test_fingerprint_is_order_free_and_sees_every_part():
    parts = {"config": "a", "unit": "b", "model_files": "c", "lock": b"d", "key": ""}
    fp = serve.fingerprint(parts)
    assert fp == serve.fingerprint(dict(reversed(list(parts.items()))))
    for name in parts:
        assert serve.fingerprint({**parts, name: "changed"}) != fp, name
    # Length-prefixed: moving a byte from one part to the next is a different fingerprint.
    assert serve.fingerprint({"a": "xy", "b": "z"}) != serve.fingerprint({"a": "x", "b": "yz"})


def parts(s, **change):
    values = {"config": "cfg", "unit": "unit", "model_files": "m1", "key_sha1": ""}
    values.update(change)
    control = serve.fingerprint(serve.service_parts(s, values["config"], values["unit"], values["key_sha1"]))
    return serve.host_fingerprint(control, values["model_files"])


def test_what_the_service_runs_is_in_its_fingerprint(tmp_path, monkeypatch):
    s = settings_for(FakeHost())
    base = parts(s)
    assert parts(s) == base
    assert parts(s, model_files="m2") != base      # weights, quantization patch, kernels
    assert parts(s, config="cfg2") != base
    assert parts(s, unit="unit2") != base
    assert parts(s, key_sha1="k") != base
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.13.0\n")
    other = dataclasses.replace(s, requirements=str(lock))
    before = parts(other)
    lock.write_text("torch==2.13.1\n")
    assert parts(other) != before
    code = tmp_path / "runtime"
    code.mkdir()
    (code / "server.py").write_text("v1")
    monkeypatch.setattr(serve, "RUNTIME", code)
    before = parts(s)
    (code / "server.py").write_text("v2")
    assert parts(s) != before


def render(s, name, device="cpu"):
    from operations.common import render as render_template

    values = serve._template_values(s, "int4", "/opt/chatglm/models/chatglm-6b-int4", "a" * 40, device)
    return render_template(name, **values)


def test_config_is_what_the_server_accepts(tmp_path):
    """The rendered server.toml goes through runtime.server's own settings loader."""
    from runtime.server import settings_from_dict

    s = settings_for(FakeHost(serve_host="0.0.0.0", serve_port=8123, serve_max_tokens=99, serve_drain_s=7))
    data = tomllib.loads(render(s, "server.toml.j2"))
    key = tmp_path / "api.key"
    key.write_text("k" * 64 + "\n")
    assert data["api_key_file"] == serve.KEY
    loaded = settings_from_dict({**data, "api_key_file": str(key)})
    assert (loaded.host, loaded.port, loaded.max_tokens, loaded.drain_timeout_s) == ("0.0.0.0", 8123, 99, 7.0)
    assert loaded.api_key == "k" * 64 and loaded.model_commit == "a" * 40


def test_unit_is_hardened_and_drains():
    s = settings_for(FakeHost(serve_drain_s=20))
    unit = render(s, "chatglm-server.service.j2")
    lines = set(unit.splitlines())
    for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "KillSignal=SIGTERM", "TimeoutStopSec=35", "User=chatglm",
                 "ReadOnlyPaths=/opt/chatglm", "ReadWritePaths=/var/lib/chatglm",
                 "WantedBy=multi-user.target", "PrivateDevices=yes"):
        assert line in lines, line
    # A GPU host's server needs /dev/nvidia*.
    assert "PrivateDevices=yes" not in render(s, "chatglm-server.service.j2", device="cuda")


def test_port_holders_fact_output():
    fact = serve_facts.PortHolders()
    seen = fact.process(["systemd=yes", "listening=yes", "holder 42 other python3 -m http.server 8000 ",
                         "holder 7 ours /opt/chatglm/venv/bin/python -m runtime.server"])
    assert seen == {"systemd": True, "listening": True,
                    "holders": [[42, "python3 -m http.server 8000", False],
                                [7, "/opt/chatglm/venv/bin/python -m runtime.server", True]]}


# --- the operations' decisions, on the fake host of the spec tests (tests/spec_harness.py) -------

from pyinfra.api.command import FileUploadCommand, StringCommand  # noqa: E402

from tests.spec_harness import FakeHost as SpecHost, run_op  # noqa: E402


class FreshFilesHost(SpecHost):
    """pyinfra's own file facts answer 'absent' (files.put/directory then upload/create)."""

    def get_fact(self, cls, *args, **kwargs):
        if cls.__module__.endswith(".files"):
            return None
        return super().get_fact(cls, *args, **kwargs)

STATE = f"serve.ServeState(unit={serve.UNIT})"
MODEL_DIR = "/opt/chatglm/models/chatglm-6b-int4"
MODEL = f"smoke.ModelFiles(path={MODEL_DIR})"


def served_state(fingerprint: str, **change) -> dict:
    return {"fingerprint": fingerprint, "unit": "u", "key": "abc chatglm 600", "active": "active",
            "enabled": "enabled", **change}


def raw(command):
    return command.get_raw_value() if isinstance(command, StringCommand) else command


@pytest.mark.parametrize("seen, words", [
    ({"systemd": False, "listening": False, "holders": []}, "does not run systemd as PID 1"),
    ({"systemd": True, "listening": True, "holders": [[42, "python3 -m http.server 8000", False]]},
     "port 8000 (setting 'serve_port') is in use by pid 42: python3 -m http.server 8000"),
    ({"systemd": True, "listening": True, "holders": []}, "port 8000 (setting 'serve_port') is in use"),
])
def test_check_port_fails_the_host_naming_what_holds_it(seen, words):
    s = settings_for(FakeHost())
    commands, fake, _ = run_op(serve.check_port, {"s": s}, "h1",
                               {f"serve.PortHolders(port=8000, unit={serve.UNIT})": seen}, fail_in=[serve])
    assert len(commands) == 1 and words in commands[0]["fail"] and "Fix:" in commands[0]["fail"], commands


def test_check_port_passes_when_the_service_itself_holds_it():
    s = settings_for(FakeHost())
    seen = {"systemd": True, "listening": True, "holders": [[7, "/opt/chatglm/venv/bin/python -m runtime.server", True]]}
    commands, fake, _ = run_op(serve.check_port, {"s": s}, "h1",
                               {f"serve.PortHolders(port=8000, unit={serve.UNIT})": seen}, fail_in=[serve])
    assert commands == [] and "held by chatglm-server.service itself" in fake.noops[0]


def test_ready_waits_only_when_what_runs_changed():
    s = settings_for(FakeHost())
    control = "c" * 32
    stored = serve.host_fingerprint(control, "m1")
    args = {"s": s, "fingerprint": control, "result_path": "/opt/chatglm/serve/ready.json", "model_dir": MODEL_DIR}
    commands, fake, _ = run_op(serve.ready, args, "h1", {STATE: served_state(stored), MODEL: "m1"}, render=raw)
    assert commands == [] and fake.noops
    for facts, extra in (({STATE: served_state(stored), MODEL: "m2"}, {}),                 # model files
                         ({STATE: served_state("x m1"), MODEL: "m1"}, {}),                  # code/config
                         ({STATE: served_state(stored, active="failed"), MODEL: "m1"}, {}),  # not running
                         ({STATE: served_state(stored, key=""), MODEL: "m1"}, {}),           # key made now
                         ({STATE: served_state(stored), MODEL: "m1"}, {"changing": True})):  # this run's ops
        commands, _, _ = run_op(serve.ready, {**args, **extra}, "h1", facts, render=lambda c: c,
                                fake_class=FreshFilesHost)
        last = raw(commands[-1])
        assert "serve/ready.py" in last and f"--fingerprint \"{control} $(cd {MODEL_DIR}" in last, last


def test_an_inventory_key_is_never_in_a_command():
    secret = "s3cret-" + "k" * 20
    s = settings_for(FakeHost(serve_api_key=secret))
    commands, _, _ = run_op(serve.api_key, {"s": s}, "h1", {STATE: served_state("", key="")}, render=lambda c: c)
    uploads = [c for c in commands if isinstance(c, FileUploadCommand)]
    assert len(uploads) == 1 and uploads[0].src.getvalue() == (secret + "\n").encode()
    assert all(secret not in str(raw(c)) for c in commands if not isinstance(c, FileUploadCommand))
    # Uploaded into a root-only directory, then moved over the key: never readable by others.
    assert uploads[0].dest.startswith(serve.CONFIG_DIR + "/.key-upload/")
    # In place: nothing to do.
    sha1 = serve._key_sha1(s)
    commands, fake, _ = run_op(serve.api_key, {"s": s}, "h1", {STATE: served_state("", key=f"{sha1} chatglm 600")})
    assert commands == [] and fake.noops


WARM = dict(install_dir="/opt/chatglm", python="/opt/chatglm/venv/bin/python", user="chatglm",
            config=f"{MODEL_DIR}/config.json", bits=4)


def test_engine_kernels_are_built_once_per_gpu_model_and_engine():
    key = serve.warm_key(4, "6c5205c4", "2.5.1+cu121", ["9.0"])
    # Each thing the compiled kernels depend on gives another key.
    assert len({key, serve.warm_key(8, "6c5205c4", "2.5.1+cu121", ["9.0"]),
                serve.warm_key(4, "22906aeb", "2.5.1+cu121", ["9.0"]),
                serve.warm_key(4, "6c5205c4", "2.6.0+cu124", ["9.0"]),
                serve.warm_key(4, "6c5205c4", "2.5.1+cu121", ["8.0"])}) == 5
    stamp = f"files.FileContents(path={serve.WARM_STAMP})"
    commands, fake, _ = run_op(serve.warm_kernels, {**WARM, "key": key}, "h1", {stamp: [key]})
    assert commands == [] and "built for this GPU" in fake.noops[0]
    # A fresh host (or another key): the cache is made the service's, the kernels compiled as
    # the service's user with the unit's cache, then the key kept.
    commands, _, _ = run_op(serve.warm_kernels, {**WARM, "key": key}, "h1", {}, render=raw,
                            fake_class=FreshFilesHost)
    assert commands[0] == "install -d -o chatglm -g chatglm -m 700 /var/lib/chatglm /var/lib/chatglm/triton"
    assert commands[1] == ("cd /opt/chatglm && runuser -u chatglm -- env PYTHONDONTWRITEBYTECODE=1 "
                           "HOME=/var/lib/chatglm TRITON_CACHE_DIR=/var/lib/chatglm/triton "
                           "/opt/chatglm/venv/bin/python -m runtime.kernels --warm "
                           f"--config {MODEL_DIR}/config.json --bits 4")
    upload = next(c for c in commands if isinstance(c, FileUploadCommand))
    assert commands.index(upload) > 1 and upload.dest == serve.WARM_STAMP
    assert upload.src.getvalue() == key + "\n"
    # fp16: the attention kernels only.
    commands, _, _ = run_op(serve.warm_kernels, {**WARM, "bits": 0, "key": key}, "h1", {}, render=raw,
                            fake_class=FreshFilesHost)
    assert commands[1].endswith("--bits ''")


def test_kernels_cli_warms_attention_only_for_an_empty_bits_list(monkeypatch, capsys):
    """The command the deploy runs for fp16 (--bits '') asks for no int kernels."""
    kernels = pytest.importorskip("runtime.kernels", exc_type=ImportError)  # needs triton
    asked = {}
    monkeypatch.setattr(kernels, "warm", lambda **kw: asked.update(kw) or {})
    kernels.main(["--warm", "--bits", ""])
    assert asked["bits_list"] == ()
