"""deploy.py with a clock: records when each operation starts and ends (bench only).

    pyinfra INVENTORY bench/stage_timer.py     (from the repo root)
Writes $CHATGLM_BENCH_TIMES (JSON: [[op name, start, end], ...]).
"""

import json
import os
import time
from pathlib import Path

from pyinfra import state
from pyinfra.api import BaseStateCallback


class Clock(BaseStateCallback):
    def __init__(self):
        self.starts, self.rows = {}, []

    def operation_start(self, state, op_hash):
        self.starts[op_hash] = time.perf_counter()

    def operation_end(self, state, op_hash):
        name = ", ".join(sorted(state.get_op_meta(op_hash).names))
        self.rows.append([name, self.starts.get(op_hash), time.perf_counter()])
        Path(os.environ["CHATGLM_BENCH_TIMES"]).write_text(json.dumps(self.rows))


if not getattr(state, "bench_clock", None):
    state.bench_clock = Clock()
    state.add_callback_handler(state.bench_clock)

exec(compile(Path("deploy.py").read_text(), "deploy.py", "exec"))
