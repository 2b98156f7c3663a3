"""operations.common.quick_operation_order: pyinfra's operation order from frames alone
gives what inspect gives."""

import inspect

import pyinfra
from pyinfra.api import util

from operations import common


def _compare():
    # One line, so that this frame's own line is the same for both.
    ours, theirs = [common._frame_info(f[0]) for f in common._stack()], [inspect.getframeinfo(f[0]) for f in inspect.stack()]  # noqa: E501
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
    quick = (common._stack, common._frame_info)

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
    common.quick_operation_order()
    assert util.stack is common._stack and util.getframeinfo is common._frame_info
    other = object()
    monkeypatch.setattr(util, "stack", other)
    common.quick_operation_order()
    assert util.stack is other
