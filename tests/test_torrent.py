"""runtime/torrent.py: the metainfo aria2 reads, its info-hash and piece hashes."""

import hashlib
import shutil
import subprocess

import pytest

from operations.settings import SettingError, Settings
from operations.swarm import check_settings
from runtime import torrent


def test_bencode_round_trip_and_key_order():
    value = {"b": [1, -2, b"x"], "a": {"z": b"", "y": 0}}
    data = torrent.bencode(value)
    assert data == b"d1:ad1:yi0e1:z0:e1:bli1ei-2e1:xee"
    assert torrent.bdecode(data) == {b"a": {b"y": 0, b"z": b""}, b"b": [1, -2, b"x"]}
    with pytest.raises(ValueError):
        torrent.bdecode(data + b"x")


def blobs_in(folder, sizes):
    out = []
    for i, size in enumerate(sizes):
        data = bytes((i * 7 + j) % 251 for j in range(size))
        oid = hashlib.sha256(data).hexdigest()
        (folder / oid).write_bytes(data)
        out.append((oid, size))
    return out, b"".join((folder / oid).read_bytes() for oid, _ in out)


def test_pieces_span_files_and_are_kept(tmp_path):
    blobs, joined = blobs_in(tmp_path, [5000, 1, 12000])
    piece = 4096
    expected = b"".join(hashlib.sha1(joined[i:i + piece]).digest()
                        for i in range(0, len(joined), piece))
    assert torrent.piece_hashes(str(tmp_path), blobs, piece) == expected
    kept = tmp_path / "kept"
    assert torrent.pieces_cached(str(tmp_path), blobs, str(kept), piece) == expected
    (tmp_path / blobs[0][0]).write_bytes(b"changed")  # read from the kept file now
    assert torrent.pieces_cached(str(tmp_path), blobs, str(kept), piece) == expected


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
def test_aria2_reads_it_with_our_info_hash_and_each_run_differs(tmp_path):
    blobs, _ = blobs_in(tmp_path, [70000, 3])
    pieces = torrent.piece_hashes(str(tmp_path), blobs, 16384)
    meta, info_hash = torrent.make("blobs", blobs, pieces, "http://127.0.0.1:1/announce", 16384)
    again, other = torrent.make("blobs", blobs, pieces, "http://127.0.0.1:1/announce", 16384)
    assert other != info_hash and len(info_hash) == 40
    (tmp_path / "t.torrent").write_bytes(meta)
    shown = subprocess.run(["aria2c", "-S", str(tmp_path / "t.torrent")], capture_output=True,
                           text=True, check=True).stdout
    assert f"Info Hash: {info_hash}" in shown
    assert "Mode: multi" in shown and "Total Length: 68KiB (70,003)" in shown
    for oid, _ in blobs:
        assert f"./blobs/{oid}" in shown


def test_swarm_settings():
    check_settings(Settings(host="h"))  # push: nothing asked of this machine
    for kw, setting in (({"weights_transfer": "p2p"}, "weights_transfer"),
                        ({"weights_transfer": "swarm", "weights_mode": "mirror"}, "weights_transfer"),
                        ({"weights_swarm_address": "10.0.0.300"}, "weights_swarm_address")):
        with pytest.raises(SettingError, match=f"host 'h': setting '{setting}'.*Fix: "):
            check_settings(Settings(host="h", **kw))
