"""operations.tuning.quick_operation_order: pyinfra's operation order from frames alone
gives what inspect gives."""

import inspect

import pyinfra
from pyinfra.api import util

from operations import tuning


def _compare():
    # One line, so that this frame's own line is the same for both.
    ours, theirs = [tuning._frame_info(f[0]) for f in tuning._stack()], [inspect.getframeinfo(f[0]) for f in inspect.stack()]  # noqa: E501
    return ([(i.filename, i.lineno, i.function) for i in ours],
            [(i.filename, i.lineno, i.function) for i in theirs])


def _nested(depth, call):
    if depth:
        return _nested(depth - 1,
                       call)  # a call spread over two lines
    return call()


def test_frames_and_lines_match_inspect():
    ours, theirs = _nested(3, _compare)
    assert len(ours) == len(theirs) > 5
    assert ours == theirs


class _State:
    current_deploy_filename = __file__
    current_op_file_number = 0


def _orders():
    plain = (inspect.stack, inspect.getframeinfo)
    quick = (tuning._stack, tuning._frame_info)

    def order(names):
        util.stack, util.getframeinfo = names
        return util.get_operation_order_from_stack(_State())
    return order(plain), order(quick)  # one line: this frame's own line is the same for both


def test_pyinfra_order_is_unchanged(monkeypatch):
    monkeypatch.setattr(pyinfra, "is_cli", True)
    monkeypatch.setattr(util, "stack", inspect.stack)
    monkeypatch.setattr(util, "getframeinfo", inspect.getframeinfo)
    before, after = _nested(2, _orders)
    assert after == before and len(before) > 3


def test_applied_only_over_inspect(monkeypatch):
    monkeypatch.setattr(util, "stack", inspect.stack)
    monkeypatch.setattr(util, "getframeinfo", inspect.getframeinfo)
    tuning.quick_operation_order()
    assert util.stack is tuning._stack and util.getframeinfo is tuning._frame_info
    other = object()
    monkeypatch.setattr(util, "stack", other)
    tuning.quick_operation_order()
    assert util.stack is other


def test_argument_types_cached_are_pyinfra_s_own(monkeypatch):
    from pyinfra.api import arguments, facts

    original = arguments.all_global_arguments
    monkeypatch.setattr(arguments, "all_global_arguments", original)
    monkeypatch.setattr(facts, "all_global_arguments", original)
    tuning.cached_argument_types()
    cached = arguments.all_global_arguments
    assert cached is not original and facts.all_global_arguments is cached
    assert cached() == original()  # the same names and types
    tuning.cached_argument_types()  # a second call keeps the first cache
    assert arguments.all_global_arguments is cached


def test_nodelay_is_set_on_the_ssh_socket():
    import socket
    from types import SimpleNamespace

    tcp = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(tcp.getsockname())
    try:
        transport = SimpleNamespace(sock=client)
        host = SimpleNamespace(connector=SimpleNamespace(
            client=SimpleNamespace(get_transport=lambda: transport)))
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        tuning._nodelay(host)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (tcp, client):
            s.close()


def test_another_pyinfra_version_leaves_pyinfra_as_it_is(monkeypatch, caplog):
    import pyinfra as module
    from pyinfra.api import arguments

    monkeypatch.setattr(module, "__version__", "3.11.0")
    monkeypatch.setattr(util, "stack", inspect.stack)
    before = arguments.all_global_arguments
    state = object()  # nothing may be touched on it
    assert tuning.apply(state) is False
    assert util.stack is inspect.stack and arguments.all_global_arguments is before
    assert ("were written for pyinfra 3.10.0, this is pyinfra 3.11.0: they are left out"
            in caplog.text)


def test_the_pinned_pyinfra_is_the_one_they_were_written_for():
    from operations.settings import ROOT

    pins = (ROOT / "requirements.txt").read_text()
    assert f"pyinfra=={tuning.PYINFRA}" in pins
