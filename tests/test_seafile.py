"""The Seafile stand-in answers as seahub and the fileserver do, faults included."""

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from lab.seafile import SeafileStandIn, parse_range

ROOT = Path(__file__).resolve().parents[1]
SIZE = 3_000_000
UNICODE_NAME = "模型 权重.bin"  # needs quoting in Location and Content-Disposition


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("seaf")
    share = base / "share"
    (share / "sub" / "deeper").mkdir(parents=True)
    (share / "big.bin").write_bytes(os.urandom(SIZE))
    (share / "config.json").write_text('{"a": 1}\n')
    (share / "sub" / "a.txt").write_text("hello\n")
    (share / "sub" / "deeper" / "b.bin").write_bytes(b"\x00" * 10)
    (share / "sub" / UNICODE_NAME).write_bytes(b"w" * 7)
    (base / "single.bin").write_bytes(b"single")
    return base


@pytest.fixture(scope="module")
def seaf(tree):
    server = SeafileStandIn(shares={"abc123": tree / "share"},
                            file_shares={"f00d": tree / "single.bin"},
                            password_shares={"beef": tree / "share"}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def clean(request):
    if "seaf" in request.fixturenames:
        seaf = request.getfixturevalue("seaf")
        seaf.clear_faults()
        # A response of the test before may be counted a moment after its client has read
        # it (the stand-in counts a block once written): let the count settle, then reset.
        last = seaf.stats()
        while True:
            time.sleep(0.05)
            now = seaf.stats()
            if now == last:
                break
            last = now
        seaf.reset_stats()


def dirents(seaf, token, path=None):
    params = {} if path is None else {"path": path}
    return requests.get(f"{seaf.url}/api/v2.1/share-links/{token}/dirents/", params=params)


def dl(seaf, path, token="abc123", **kw):
    return requests.get(f"{seaf.url}/d/{token}/files/", params={"p": path, "dl": "1"},
                        allow_redirects=False, **kw)


def location(seaf, path):
    resp = dl(seaf, path)
    assert resp.status_code == 302
    return resp.headers["Location"]


def iso(path):
    tz = datetime.timezone(datetime.timedelta(hours=8))
    return datetime.datetime.fromtimestamp(int(path.stat().st_mtime), tz).isoformat()


def test_list_root_exact_fields(seaf, tree):
    share = tree / "share"
    resp = dirents(seaf, "abc123")  # path defaults to '/'
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    # Seafile's order: names descending, folders and files mixed
    assert resp.json() == {"dirent_list": [
        {"size": 0, "last_modified": iso(share / "sub"), "is_dir": True,
         "folder_path": "/sub/", "folder_name": "sub"},
        {"size": 9, "last_modified": iso(share / "config.json"), "is_dir": False,
         "file_path": "/config.json", "file_name": "config.json"},
        {"size": SIZE, "last_modified": iso(share / "big.bin"), "is_dir": False,
         "file_path": "/big.bin", "file_name": "big.bin"},
    ]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+08:00",
                        resp.json()["dirent_list"][0]["last_modified"])


@pytest.mark.parametrize("path", ["/sub/", "/sub", "sub"])
def test_list_subfolder(seaf, path):
    entries = dirents(seaf, "abc123", path).json()["dirent_list"]
    by_name = {e.get("file_name") or e.get("folder_name"): e for e in entries}
    assert [e.get("file_name") or e.get("folder_name") for e in entries] == \
        [UNICODE_NAME, "deeper", "a.txt"]
    assert by_name["deeper"]["folder_path"] == "/sub/deeper/"
    assert by_name["a.txt"]["file_path"] == "/sub/a.txt"
    assert by_name["a.txt"]["size"] == 6
    assert by_name[UNICODE_NAME]["file_path"] == f"/sub/{UNICODE_NAME}"
    assert set(by_name["a.txt"]) == {"size", "last_modified", "is_dir", "file_path", "file_name"}
    assert set(by_name["deeper"]) == {"size", "last_modified", "is_dir", "folder_path",
                                      "folder_name"}


def test_listing_errors(seaf):
    resp = dirents(seaf, "0000")
    assert (resp.status_code, resp.json()) == (404, {"error_msg": "Share link 0000 not found."})
    resp = dirents(seaf, "abc123", "/x/")
    assert (resp.status_code, resp.json()) == (404, {"error_msg": "Folder /x/ not found."})
    assert dirents(seaf, "abc123", "/big.bin/").status_code == 404  # a file is no folder
    assert dirents(seaf, "abc123", "/../").status_code == 404
    resp = dirents(seaf, "f00d")
    assert (resp.status_code, resp.json()) == (
        400, {"error_msg": "Share link f00d is not a folder share link."})
    resp = dirents(seaf, "beef")
    assert (resp.status_code, resp.json()) == (403, {"error_msg": "Permission denied."})


def test_download_page_errors(seaf):
    assert dl(seaf, "/big.bin", token="0000").status_code == 404
    assert dl(seaf, "/single.bin", token="f00d").status_code == 404  # file link under /d/
    missing = dl(seaf, "/nope.bin")  # seahub's render_error: 200 and an HTML error page
    assert missing.status_code == 200 and "Location" not in missing.headers
    assert "File does not exist" in missing.text
    locked = dl(seaf, "/big.bin", token="beef")  # password form, no redirect
    assert locked.status_code == 200 and 'name="password"' in locked.text


def test_dl_redirects_to_fileserver(seaf, tree):
    for path in ["/big.bin", f"/sub/{UNICODE_NAME}", "sub/a.txt"]:
        loc = location(seaf, path)
        m = re.fullmatch(rf"http://127\.0\.0\.1:{seaf.port}/seafhttp/files/([^/]{{36}})/([^/]+)",
                         loc)
        assert m, loc
        assert str(uuid.UUID(m.group(1))) == m.group(1)
        assert m.group(2) == quote(Path(path).name)
    page = requests.get(f"{seaf.url}/d/abc123/files/", params={"p": "/big.bin"},
                        allow_redirects=False)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    file_link = requests.get(f"{seaf.url}/f/f00d/", params={"dl": "1"}, allow_redirects=False)
    assert file_link.status_code == 302
    assert requests.get(file_link.headers["Location"]).content == b"single"


def test_full_get_and_head(seaf, tree):
    loc = location(seaf, "/big.bin")
    resp = requests.get(loc)
    assert resp.status_code == 200
    assert resp.content == (tree / "share" / "big.bin").read_bytes()
    h = resp.headers
    assert h["Content-Length"] == str(SIZE)
    assert h["Content-Type"] == "application/octet-stream"
    assert h["Content-Disposition"] == "attachment;filename*=utf-8''big.bin;filename=\"big.bin\""
    assert "Last-Modified" in h and len(h["ETag"]) == 40
    assert "Accept-Ranges" not in h  # Seafile sends it on 206 answers only
    head = requests.head(loc)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(SIZE)
    uni = requests.get(location(seaf, f"/sub/{UNICODE_NAME}"))
    assert uni.content == b"w" * 7
    assert f"filename*=utf-8''{quote(UNICODE_NAME, safe='')}" in uni.headers["Content-Disposition"]
    assert requests.get(loc, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}
                        ).status_code == 304  # the fileserver's shortcut


@pytest.mark.parametrize("header,start,end", [
    ("bytes=100-199", 100, 199),
    ("bytes=2999000-", 2999000, SIZE - 1),
    ("bytes=-500", SIZE - 500, SIZE - 1),
    ("bytes=2999990-9999999", 2999990, SIZE - 1),
])
def test_range(seaf, tree, header, start, end):
    data = (tree / "share" / "big.bin").read_bytes()
    resp = requests.get(location(seaf, "/big.bin"), headers={"Range": header})
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert resp.content == data[start:end + 1]


@pytest.mark.parametrize("header", ["bytes=3000000-", "bytes=-0", "bytes=0-1,5-6", "bytes=9-3",
                                    "bytes=x-"])
def test_range_unsatisfiable(seaf, header):
    resp = requests.get(location(seaf, "/big.bin"), headers={"Range": header})
    assert resp.status_code == 416
    assert resp.headers["Content-Range"] == f"bytes */{SIZE}"


def test_parse_range_suffix_longer_than_file():
    assert parse_range("bytes=-20", 10) is None  # Go's unsigned underflow ends in 416
    assert parse_range("bytes=0-0", 10) == (0, 0)


def test_token_reusable_then_expires(tree):
    with SeafileStandIn(shares={"abc123": tree / "share"}, token_ttl=0.5) as seaf:
        loc = location(seaf, "/sub/a.txt")
        assert requests.get(loc).text == "hello\n"
        assert requests.get(loc).text == "hello\n"  # not one-time
        time.sleep(0.6)
        gone = requests.get(loc)
        assert (gone.status_code, gone.text) == (403, "Bad access token\n")
        fresh = location(seaf, "/sub/a.txt")
        assert fresh != loc and requests.get(fresh).text == "hello\n"
        assert requests.get(f"{seaf.url}/seafhttp/files/{uuid.uuid4()}/a.txt").status_code == 403


def test_lab_expire(seaf):
    loc = location(seaf, "/sub/a.txt")
    assert requests.post(f"{seaf.url}/_lab/expire").status_code == 200
    assert requests.get(loc).status_code == 403
    assert requests.get(location(seaf, "/sub/a.txt")).status_code == 200


def add_faults(seaf, *rules):
    resp = requests.post(f"{seaf.url}/_lab/faults", json=list(rules))
    assert resp.status_code == 200, resp.text


def test_fault_cut_then_resume(seaf, tree):
    data = (tree / "share" / "big.bin").read_bytes()
    add_faults(seaf, {"match": "big.bin", "kind": "cut", "after": 100_000})
    loc = location(seaf, "/big.bin")
    got = bytearray()
    with pytest.raises(requests.exceptions.RequestException):
        with requests.get(loc, stream=True) as resp:
            assert resp.headers["Content-Length"] == str(SIZE)  # promised all, sent less
            for chunk in resp.iter_content(65536):
                got += chunk
    # the server sent exactly 100000 bytes; the client keeps a prefix of them
    assert seaf.stats()["bytes_sent"] == 100_000 and 0 < len(got) <= 100_000
    assert bytes(got) == data[:len(got)]
    rest = requests.get(loc, headers={"Range": f"bytes={len(got)}-"})  # times=1: used up
    assert rest.status_code == 206 and bytes(got) + rest.content == data


def test_fault_expire_cuts_and_kills_the_token(seaf, tree):
    data = (tree / "share" / "big.bin").read_bytes()
    add_faults(seaf, {"match": "big.bin", "kind": "expire", "after": 70_000})
    loc = location(seaf, "/big.bin")
    with pytest.raises(requests.exceptions.RequestException):
        with requests.get(loc, stream=True) as resp:
            for _ in resp.iter_content(65536):
                pass
    assert seaf.stats()["bytes_sent"] == 70_000
    dead = requests.get(loc, headers={"Range": "bytes=70000-"})
    assert (dead.status_code, dead.text) == (403, "Bad access token\n")
    # A fresh redirect resumes where the break was.
    rest = requests.get(location(seaf, "/big.bin"), headers={"Range": "bytes=70000-"})
    assert rest.status_code == 206 and rest.content == data[70_000:]


def test_fault_corrupt_is_kept_for_the_response_that_sends_its_byte(seaf, tree):
    data = (tree / "share" / "big.bin").read_bytes()
    add_faults(seaf, {"match": "big.bin", "kind": "cut", "after": 1000},
               {"match": "big.bin", "kind": "corrupt", "offset": 2000})
    loc = location(seaf, "/big.bin")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(loc).content
    rest = requests.get(loc, headers={"Range": "bytes=1000-"}).content
    assert rest[1000] == data[2000] ^ 0xFF and rest[1001:] == data[2001:]


def test_fault_corrupt(seaf, tree):
    data = (tree / "share" / "big.bin").read_bytes()
    add_faults(seaf, {"match": "/big.bin", "kind": "corrupt", "offset": 1_234_567})
    loc = location(seaf, "/big.bin")
    # a range that misses the offset neither shows nor uses up the fault
    assert requests.get(loc, headers={"Range": "bytes=0-99"}).content == data[:100]
    bad, off = requests.get(loc).content, 1_234_567
    assert len(bad) == SIZE and bad[:off] == data[:off] and bad[off + 1:] == data[off + 1:]
    assert bad[off] == data[off] ^ 0xFF
    assert requests.get(loc).content == data


def test_fault_status_everywhere(seaf):
    loc = location(seaf, "/config.json")
    add_faults(seaf, {"match": "a.txt", "kind": "status", "code": 500},
               {"match": "/sub/deeper/", "kind": "status", "code": 503},
               {"match": "config", "kind": "status", "code": 502, "times": 2})
    assert dl(seaf, "/sub/a.txt").status_code == 500
    assert dl(seaf, "/sub/a.txt").status_code == 302
    assert dirents(seaf, "abc123", "/sub/deeper/").status_code == 503
    assert [requests.get(loc).status_code for _ in range(3)] == [502, 502, 200]
    assert requests.get(f"{seaf.url}/_lab/faults").json() == {"faults": []}


def test_fault_slow_and_always(seaf):
    add_faults(seaf, {"match": "big", "kind": "slow", "delay": 0.5, "times": -1})
    loc = location(seaf, "/big.bin")
    for _ in range(2):
        t0 = time.monotonic()
        assert len(requests.get(loc, headers={"Range": "bytes=0-1048575"}).content) == 1 << 20
        assert time.monotonic() - t0 >= 0.45
    assert len(requests.get(f"{seaf.url}/_lab/faults").json()["faults"]) == 1
    assert requests.delete(f"{seaf.url}/_lab/faults").status_code == 200
    t0 = time.monotonic()
    requests.get(loc, headers={"Range": "bytes=0-1048575"})
    assert time.monotonic() - t0 < 0.3


def test_bad_fault_rule_is_refused(seaf):
    for rule in [{"match": "x", "kind": "melt"}, {"match": "x", "kind": "cut"},
                 {"match": "x", "kind": "cut", "after": 1, "times": 0}]:
        assert requests.post(f"{seaf.url}/_lab/faults", json=[rule]).status_code == 400


def test_stats_count_bytes(seaf):
    loc = location(seaf, "/big.bin")
    requests.get(loc)
    requests.get(loc, headers={"Range": "bytes=-10"})
    requests.head(loc)
    dirents(seaf, "abc123")
    stats = requests.get(f"{seaf.url}/_lab/stats").json()
    assert stats == {"requests": 5, "bytes_sent": SIZE + 10,
                     "per_file": {"/big.bin": SIZE + 10}, "redirects": 1, "listings": 1}
    requests.delete(f"{seaf.url}/_lab/stats")
    assert seaf.stats() == {"requests": 0, "bytes_sent": 0, "per_file": {}, "redirects": 0,
                            "listings": 0}


def test_stop_leaves_no_threads(tree):
    before = set(threading.enumerate())
    seaf = SeafileStandIn(shares={"abc123": tree / "share"}).start()
    session = requests.Session()  # holds a keep-alive connection open across stop()
    assert session.get(location(seaf, "/sub/a.txt")).status_code == 200
    seaf.stop()
    session.close()
    assert [(t.name, t.daemon) for t in set(threading.enumerate()) - before] == []


def test_cli_prints_port_and_stops_on_sigterm(tree, tmp_path):
    pidfile = tmp_path / "seaf.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.seafile", "--port", "0", "--share",
         f"abc123={tree / 'share'}", "--token-ttl", "60", "--pidfile", str(pidfile)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        resp = requests.get(f"http://127.0.0.1:{port}/api/v2.1/share-links/abc123/dirents/")
        assert resp.status_code == 200 and pidfile.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
