"""operations/factcache.py: the batch protocol, run through a real shell."""

import json
import subprocess

from pyinfra.api import FactBase
from pyinfra.facts.files import File, Sha1File
from pyinfra.facts.server import LinuxDistribution

from facts.system import HostResources
from operations import factcache


class Fails(FactBase):
    def command(self):
        return "echo partial; exit 3"


class Commented(FactBase):
    def command(self):
        return "echo one  # a trailing comment must not eat the batch's ')'"


class LooksLikeMarker(FactBase):
    def command(self, nonce):
        return f"echo {nonce}-rc 0; echo {nonce}-7; echo after"


def run_batch(facts):
    """The batch of facts as prefetch builds it, run by sh, cut back per fact."""
    nonce = "@@chatglm-fact-test"
    commands = [factcache._fact_command(cls, kwargs) for cls, kwargs in facts]
    command = factcache.batch_command(commands, nonce)
    out = subprocess.run(["sh", "-c", command.get_raw_value()], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return factcache._split(out, nonce, len(facts))


def live(cls, kwargs):
    command = factcache._call(cls().command, kwargs)
    command = command.get_raw_value() if hasattr(command, "get_raw_value") else command
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    return proc.returncode, proc.stdout.splitlines()


def test_batch_gives_each_fact_what_its_own_command_gives(tmp_path):
    (tmp_path / "f").write_text("x")
    facts = [(HostResources, {}), (File, {"path": str(tmp_path / "f")}),
             (File, {"path": str(tmp_path / "missing")}), (Sha1File, {"path": str(tmp_path / "f")}),
             (LinuxDistribution, {}), (Commented, {})]
    got = run_batch(facts)
    assert len(got) == len(facts)
    for i, (cls, kwargs) in enumerate(facts):
        assert got[i] == live(cls, kwargs), cls


def test_failing_fact_keeps_its_status_and_markers_in_output_do_not_split():
    got = run_batch([(Fails, {}), (LooksLikeMarker, {"nonce": "@@other"}), (HostResources, {})])
    assert got[0] == (3, ["partial"])
    assert got[1][0] == 0 and got[1][1][-1] == "after"
    assert got[2][0] == 0 and len(got[2][1]) == 2


class NeedsMissing(FactBase):
    def requires_command(self):
        return "no-such-command-chatglm"

    def command(self):
        return "echo never"


class NeedsSh(FactBase):
    def requires_command(self):
        return "sh"

    def command(self):
        return "echo present"


def test_a_fact_whose_command_is_missing_gets_pyinfras_marker():
    got = run_batch([(NeedsMissing, {}), (NeedsSh, {})])
    assert got[0] == (0, [factcache.MISSING_COMMAND_MARKER])  # left to pyinfra's own read
    assert got[1] == (0, ["present"])


def test_facts_pyinfra_reads_its_own_way_are_not_batched():
    from pyinfra.facts.apk import ApkPackages  # requires_command "apk": batched behind it
    from pyinfra.facts.hardware import Ipv4Addrs  # a ShortFactBase
    assert factcache._batchable(File)
    assert factcache._batchable(HostResources)
    assert factcache._batchable(ApkPackages)
    assert not factcache._batchable(Ipv4Addrs)
    assert not factcache._batchable(factcache.Batch)


def test_plan_names_differ_per_address_and_keys_are_stable(tmp_path):
    class FakeHost:
        def __init__(self, name, port):
            self.name, self.data = name, {"ssh_hostname": "127.0.0.1", "ssh_port": port}
    a = factcache.plan_path(str(tmp_path), FakeHost("h1", 2201))
    b = factcache.plan_path(str(tmp_path), FakeHost("h1", 3101))
    assert a != b and a.parent == b.parent == tmp_path / "fact-plans"
    assert factcache._key(File, {"path": "/x"}) == factcache._key(File, json.loads('{"path": "/x"}'))
    assert factcache._key(File, {"path": object()}) is None


def test_a_prelude_runs_first_in_the_same_command_and_leaves_the_facts_as_they_were(tmp_path):
    """The deploy lock rides in the batch's command (operations/hostlock.py): its lines come
    before the facts', which split as without it; with no fact at all it still runs."""
    nonce = "@@chatglm-fact-test"
    facts = [(HostResources, {}), (Fails, {})]
    commands = [factcache._fact_command(cls, kwargs) for cls, kwargs in facts]
    marker = tmp_path / "ran"
    prelude = f"( echo '@@lock taken 1'; echo 'two words' ); touch {marker}"
    for batch in (commands, []):
        marker.unlink(missing_ok=True)
        command = factcache.batch_command(batch, nonce, prelude).get_raw_value()
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        assert out[:2] == ["@@lock taken 1", "two words"] and marker.exists()
        got = factcache._split(out, nonce, len(batch))
        assert got == ({0: live(HostResources, {}), 1: (3, ["partial"])} if batch else {})
