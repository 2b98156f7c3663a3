"""Stand-in for the share-link download path of a Seafile server (seahub + fileserver).

    python -m lab.seafile --port 0 --share 674208019e314311ab5c=/srv/models \\
        [--file-share TOKEN=FILE] [--password-share TOKEN=DIR] [--token-ttl 3600] [--pidfile F]

Imitates, from seahub and seafile-server sources (Go fileserver):
  GET /api/v2.1/share-links/<t>/dirents/?path=/x/   folder listing, seahub's JSON and errors
  GET /d/<t>/files/?p=/x/f&dl=1                     302 to /seafhttp/files/<uuid4>/<name>
  GET /f/<t>/?dl=1                                  the same for a file share link
  GET|HEAD /seafhttp/files/<uuid4>/<name>           the bytes, single Range, token expiry
Lab-only control API (no Seafile has it), under /_lab/:
  POST/GET/DELETE /_lab/faults, POST /_lab/expire, GET/DELETE /_lab/stats
Fault rule: {"match": substring of file path or name,
  "kind": "cut"|"expire"|"corrupt"|"status"|"slow", "after": N (cut, expire: bytes sent before
  the connection drops; expire also kills the access token, as when a long download outlives
  it), "offset": N (corrupt, file offset), "code": N (status), "delay": s per MiB (slow),
  "times": requests it applies to (default 1, -1 = always)}.
POST appends rules; DELETE clears them.

Not imitated: the password form POST (password shares always refuse), share-link expiry,
seahub's throttling (429), login-required links, directory zip downloads, multi-range,
upload, and content-addressed storage (files are read live from disk; the ETag is not a
content hash).
"""

import argparse
import datetime
import hashlib
import html
import json
import posixpath
import re
import socket
import sys
import threading
import time
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from lab.pyindex import LabHTTPServer, wait_for_signal

CHUNK = 64 * 1024  # the fileserver's own read size
SENDFILE_CHUNK = 4 * 1024 * 1024  # one count (and cut check) per 4 MiB sent
MIB = 1024 * 1024
TOKEN_RE = r"[A-Za-z0-9]+"  # seahub's URLs take [a-f0-9]+; letters allowed for readable tests
# The fileserver's short suffix map (parseContentType); everything else is octet-stream.
CONTENT_TYPES = {"txt": "text/plain; charset=gbk", "pdf": "application/pdf",
                 "zip": "application/zip", "png": "image/png", "jpg": "image/jpeg",
                 "jpeg": "image/jpeg", "gif": "image/gif", "mp4": "video/mp4"}
FAULT_KINDS = {"cut": "after", "expire": "after", "corrupt": "offset", "status": "code",
               "slow": "delay"}
TSINGHUA_TZ = datetime.timezone(datetime.timedelta(hours=8))  # seahub prints its TIME_ZONE


class Share:
    def __init__(self, token, path, kind, password=False):
        if not re.fullmatch(TOKEN_RE, token):
            raise ValueError(f"share token {token!r} must be letters and digits")
        self.token, self.root, self.kind, self.password = token, Path(path).resolve(), kind, password
        if kind == "d" and not self.root.is_dir():
            raise ValueError(f"folder share {token}: {path} is not a folder")
        if kind == "f" and not self.root.is_file():
            raise ValueError(f"file share {token}: {path} is not a file")

    def resolve(self, seaf_path):
        """Local path of a path inside the share; None where Seafile would find nothing."""
        parts = [p for p in seaf_path.split("/") if p not in ("", ".")]
        if ".." in parts:  # a literal name to Seafile, so never found
            return None
        return self.root.joinpath(*parts)


def normalize_dir_path(path):
    path = path.strip("/")
    return "/" if not path else f"/{path}/"


def normalize_file_path(path):
    return "/" + path.strip("/")


def parse_range(value, size):
    """(start, end) for a Range header the way the Go fileserver reads it, else None (416).

    Only one range; `bytes=-0`, a start past the end and lists ("0-1,5-6") are refused.
    """
    eq, dash = value.find("="), value.find("-")
    if dash < 0:
        return None
    first, last = value[eq + 1:dash], value[dash + 1:]
    digits = re.compile(r"[0-9]+")
    if eq + 1 == dash:  # bytes=-N: the last N bytes
        if not digits.fullmatch(last) or int(last) == 0:
            return None
        start, end = size - int(last), size - 1
    elif not digits.fullmatch(first):
        return None
    elif last == "":  # bytes=N-
        start, end = int(first), size - 1
    elif digits.fullmatch(last):
        start, end = int(first), min(int(last), size - 1)
    else:
        return None
    return (start, end) if 0 <= start <= end else None


class SeafileStandIn:
    """In-process server: SeafileStandIn({"tok": "/dir"}).start() ... .stop(); or a `with` block."""

    def __init__(self, shares=None, file_shares=None, password_shares=None, port=0,
                 token_ttl=3600, tz=TSINGHUA_TZ, bad_token=(403, "Bad access token"),
                 verbose=False):
        self.shares = {}
        for kind, password, table in (("d", False, shares), ("f", False, file_shares),
                                      ("d", True, password_shares)):
            for token, path in (table or {}).items():
                self.shares[token] = Share(token, path, kind, password)
        self.port_wanted, self.token_ttl, self.tz, self.verbose = port, token_ttl, tz, verbose
        # Fileserver versions differ for a dead access token: 400 "Bad access token" (older Go),
        # 403 "Access token not found" (newest); 403 "Bad access token" is the default here.
        # A client must take any 400/403 there as "ask dl=1 again".
        self.bad_token = bad_token
        self.lock = threading.Lock()
        self.tokens = {}  # access token -> (file_path, local path, monotonic expiry)
        self.faults = []
        self.reset_stats()
        self._server = None

    # -- lifecycle
    def start(self):
        self._server = _Server(self, self.port_wanted).start()
        return self

    def stop(self):
        if self._server:
            self._server.stop()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._server.port

    @property
    def url(self):
        return self._server.url

    # -- the same controls as /_lab/, for in-process tests
    def add_faults(self, rules):
        checked = [_check_rule(rule) for rule in rules]
        with self.lock:
            self.faults.extend(checked)
            return [dict(r) for r in self.faults]

    def clear_faults(self):
        with self.lock:
            self.faults.clear()

    def expire_tokens(self, only=None):
        with self.lock:
            for token, (file_path, local, _expiry) in self.tokens.items():
                if only is None or token == only:
                    self.tokens[token] = (file_path, local, 0.0)

    def stats(self):
        with self.lock:
            return json.loads(json.dumps(self._stats))

    def reset_stats(self):
        with self.lock:
            self._stats = {"requests": 0, "bytes_sent": 0, "per_file": {}, "redirects": 0,
                           "listings": 0}

    # -- helpers for the handler
    def issue_token(self, file_path, local):
        token = str(uuid.uuid4())
        now = time.monotonic()
        with self.lock:
            for old in [t for t, v in self.tokens.items() if v[2] <= now]:
                del self.tokens[old]
            self.tokens[token] = (file_path, local, now + self.token_ttl)
            self._stats["redirects"] += 1
        return token

    def lookup_token(self, token):
        with self.lock:
            entry = self.tokens.get(token)
        return entry if entry and entry[2] > time.monotonic() else None

    def take_fault(self, kind, names, span=None):
        """First rule of kind matching one of names (and, for corrupt, inside span); uses it up."""
        with self.lock:
            for rule in self.faults:
                if rule["kind"] != kind or not any(rule["match"] in n for n in names):
                    continue
                if span and not span[0] <= rule.get("offset", -1) < span[1]:
                    continue
                if rule["times"] > 0:
                    rule["times"] -= 1
                    if rule["times"] == 0:
                        self.faults.remove(rule)
                return dict(rule)
        return None

    def count(self, file_path=None, nbytes=0, request=False, listing=False):
        with self.lock:
            if request:
                self._stats["requests"] += 1
            if listing:
                self._stats["listings"] += 1
            if nbytes:
                self._stats["bytes_sent"] += nbytes
                per_file = self._stats["per_file"]
                per_file[file_path] = per_file.get(file_path, 0) + nbytes


def _check_rule(rule):
    if not isinstance(rule, dict) or rule.get("kind") not in FAULT_KINDS:
        raise ValueError(f"fault rule needs kind in {sorted(FAULT_KINDS)}: {rule!r}")
    param = FAULT_KINDS[rule["kind"]]
    if not isinstance(rule.get("match"), str) or not isinstance(rule.get(param), (int, float)):
        raise ValueError(f"{rule['kind']} rule needs 'match' (string) and '{param}' (number)")
    times = rule.get("times", 1)
    if not isinstance(times, int) or times == 0 or times < -1:
        raise ValueError("'times' must be a positive integer or -1 (always)")
    return {**rule, "times": times}


class _Server(LabHTTPServer):
    def __init__(self, standin, port):
        self.standin = standin
        super().__init__(_Handler, port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as downloaders reuse connections

    def version_string(self):
        return "nginx"  # what sits in front of seahub and the fileserver

    routes = [
        ("GET", rf"/api/v2\.1/share-links/({TOKEN_RE})/dirents/", "dirents"),
        ("GET", rf"/d/({TOKEN_RE})/", "share_page"),
        ("GET", rf"/d/({TOKEN_RE})/files/", "shared_dir_file"),
        ("GET", rf"/f/({TOKEN_RE})/", "shared_file"),
        ("GET", r"/seafhttp/files/([^/]+)/([^/]+)", "fileserver"),
        ("POST", r"/_lab/faults", "lab_add_faults"),
        ("GET", r"/_lab/faults", "lab_faults"),
        ("DELETE", r"/_lab/faults", "lab_clear_faults"),
        ("POST", r"/_lab/expire", "lab_expire"),
        ("GET", r"/_lab/stats", "lab_stats"),
        ("DELETE", r"/_lab/stats", "lab_reset_stats"),
    ]

    @property
    def seaf(self):
        return self.server.standin

    def log_message(self, fmt, *args):
        if self.seaf.verbose:
            super().log_message(fmt, *args)

    # -- dispatch
    def _dispatch(self, method):
        url = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if not url.path.startswith("/_lab/"):
            self.seaf.count(request=True)
        for verb, pattern, name in self.routes:
            match = re.fullmatch(pattern, url.path)
            if match and (verb == method or (verb == "GET" and method == "HEAD")):
                return getattr(self, name)(*match.groups())
        if any(re.fullmatch(p, url.path) for _, p, _ in self.routes):
            return self._send(405, b"Method Not Allowed\n", "text/plain")
        return self._page(404, "Page not found", "Sorry, but the requested page could not be found.")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- responses
    def _send(self, code, body=b"", ctype="text/html; charset=utf-8", headers=()):
        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        if body or code not in (204, 304):
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code, obj):
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _page(self, code, title, text, extra=""):
        body = (f"<!DOCTYPE html><html><head><title>{html.escape(title)} - Seafile</title></head>"
                f"<body><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{extra}</body></html>\n")
        self._send(code, body.encode())

    def _status_fault(self, names):
        rule = self.seaf.take_fault("status", names)
        return rule and int(rule["code"])

    # -- seahub
    def dirents(self, token):
        self.seaf.count(listing=True)
        request_path = self.query.get("path", "/")
        code = self._status_fault([request_path])
        if code:
            return self._json(code, {"error_msg": "Internal Server Error"})
        share = self.seaf.shares.get(token)
        if share is None:
            return self._json(404, {"error_msg": f"Share link {token} not found."})
        if share.password:  # seahub checks the password before the link type
            return self._json(403, {"error_msg": "Permission denied."})
        if share.kind != "d":
            return self._json(400, {"error_msg": f"Share link {token} is not a folder share link."})
        folder = share.resolve(request_path)
        if folder is None or not folder.is_dir():
            # seahub quotes the path as the client sent it, not normalized
            return self._json(404, {"error_msg": f"Folder {request_path} not found."})
        entries = []
        # Seafile keeps dirents sorted by name, descending (strcmp on UTF-8), dirs and files mixed.
        for child in sorted(folder.iterdir(), key=lambda p: p.name.encode(), reverse=True):
            if not (child.is_dir() or child.is_file()):
                continue
            st = child.stat()
            entry_path = posixpath.join(request_path, child.name)
            entry = {"size": 0 if child.is_dir() else st.st_size,
                     "last_modified": datetime.datetime.fromtimestamp(
                         int(st.st_mtime), self.seaf.tz).isoformat(),
                     "is_dir": child.is_dir()}
            if child.is_dir():
                entry.update(folder_path=normalize_dir_path(entry_path), folder_name=child.name)
            else:
                entry.update(file_path=normalize_file_path(entry_path), file_name=child.name)
            entries.append(entry)
        self._json(200, {"dirent_list": entries})

    def share_page(self, token):
        share = self.seaf.shares.get(token)
        if share is None or share.kind != "d":
            return self._page(404, "Page not found", "Sorry, but the requested page could not be found.")
        self._page(200, share.root.name, "Shared folder (the real page is a JavaScript app).")

    def _password_form(self, token):
        # seahub renders share_access_validation.html with status 200, not an error code.
        form = (f'<form action="/d/{token}/" method="post"><input type="hidden" '
                f'name="csrfmiddlewaretoken" value="{uuid.uuid4().hex}">'
                '<input type="password" name="password"><button>Submit</button></form>')
        self._page(200, "Please input the password", "This link is password protected.", form)

    def _redirect_to_fileserver(self, file_path, local):
        token = self.seaf.issue_token(file_path, local)
        location = f"{self.server.url}/seafhttp/files/{token}/{quote(local.name)}"
        self._send(302, b"", headers=[("Location", location)])

    def shared_dir_file(self, token):
        req_path = self.query.get("p", "")
        code = req_path and self._status_fault([req_path, posixpath.basename(req_path)])
        if code:
            return self._page(code, "Internal Server Error", "Internal Server Error")
        share = self.seaf.shares.get(token)
        if share is None or share.kind != "d":
            return self._page(404, "Page not found", "Sorry, but the requested page could not be found.")
        if not req_path:
            return self._send(302, b"", headers=[("Location", f"/d/{token}/")])
        if share.password:
            return self._password_form(token)
        local = share.resolve(req_path)
        if local is None or not local.is_file():
            # seahub's render_error(): an error page with status 200, not 404
            return self._page(200, "Error", "File does not exist")
        if self.query.get("dl") == "1":
            return self._redirect_to_fileserver(normalize_file_path(req_path), local)
        self._page(200, local.name, f"{local.stat().st_size} bytes. Preview page.")

    def shared_file(self, token):
        share = self.seaf.shares.get(token)
        if share is None or share.kind != "f":
            return self._page(404, "Page not found", "Sorry, but the requested page could not be found.")
        if share.password:
            return self._password_form(token)
        if self.query.get("dl") == "1":
            return self._redirect_to_fileserver("/" + share.root.name, share.root)
        self._page(200, share.root.name, "Shared file. Preview page.")

    # -- fileserver
    def fileserver(self, access_token, quoted_name):
        entry = self.seaf.lookup_token(access_token)
        if entry is None:
            code, message = self.seaf.bad_token
            return self._send(code, f"{message}\n".encode(), "text/plain; charset=utf-8")
        file_path, local = entry[0], entry[1]
        name = unquote(quoted_name)
        names = [file_path, name]
        if "If-Modified-Since" in self.headers:  # the Go fileserver's shortcut, any date
            return self._send(304)
        code = self._status_fault(names)
        if code:
            return self._send(code, b"Internal server error\n", "text/plain; charset=utf-8")
        try:
            size, mtime_ns = local.stat().st_size, local.stat().st_mtime_ns
        except OSError:
            return self._send(400, b"Invalid file id\n", "text/plain; charset=utf-8")
        ctype = CONTENT_TYPES.get(name.rsplit(".", 1)[-1].lower() if "." in name else "",
                                  "application/octet-stream")
        headers = [
            # the real ETag is the content's object id; a hash of the file's identity will do
            ("ETag", hashlib.sha1(f"{local}:{size}:{mtime_ns}".encode()).hexdigest()),
            ("Last-Modified", formatdate(usegmt=True)),  # the time of the request, like Seafile
            ("Cache-Control", "max-age=3600"),
            ("Access-Control-Allow-Origin", "*"),
            ("Content-Type", ctype),
            # filename="..." carries raw UTF-8 bytes, as the real server sends them
            ("Content-Disposition", f"attachment;filename*=utf-8''{quote(name, safe='')};"
             f"filename=\"{name}\"".encode().decode("latin-1")),
            ("X-Content-Type-Options", "nosniff"),
        ]
        byte_range = self.headers.get("Range")
        if byte_range and size > 0:
            span = parse_range(byte_range, size)
            if span is None:
                return self._send(416, b"", "text/plain; charset=utf-8",
                                  [("Content-Range", f"bytes */{size}")])
            start, end = span
            self.send_response(206)
            headers += [("Accept-Ranges", "bytes"), ("Content-Range", f"bytes {start}-{end}/{size}")]
        else:  # note: no Accept-Ranges on a 200, as Seafile
            start, end = 0, size - 1
            self.send_response(200)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "GET" and end >= start:
            self._stream(file_path, local, names, start, end + 1, access_token)

    def _stream(self, file_path, local, names, start, stop, access_token):
        seaf = self.seaf
        limit = stop
        cut = seaf.take_fault("cut", names)
        expire = seaf.take_fault("expire", names)
        for rule in (cut, expire):
            if rule:
                limit = min(limit, start + int(rule["after"]))
        if expire:
            seaf.expire_tokens(only=access_token)
        # A corrupt rule is used up only by a response that sends its byte.
        corrupt = seaf.take_fault("corrupt", names, span=(start, limit))
        slow = seaf.take_fault("slow", names)
        pos = start
        try:
            with open(local, "rb") as f:
                if not corrupt and not slow:
                    # Bytes as they lie on disk go through sendfile: a Python read/write
                    # loop took a whole core at loopback speed, so a client benchmark
                    # measured this stand-in (the real fileserver is native code).
                    while pos < limit:
                        sent = self.connection.sendfile(f, pos, min(SENDFILE_CHUNK, limit - pos))
                        if not sent:
                            break  # the file shrank under us; the client sees a short body
                        pos += sent
                        seaf.count(file_path, sent)
                f.seek(pos)
                while pos < limit:
                    chunk = f.read(min(CHUNK, limit - pos))
                    if not chunk:
                        break  # the file shrank under us; the client sees a short body
                    if corrupt and pos <= corrupt["offset"] < pos + len(chunk):
                        i = int(corrupt["offset"]) - pos
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                    if slow:
                        time.sleep(float(slow["delay"]) * len(chunk) / MIB)
                    self.wfile.write(chunk)
                    pos += len(chunk)
                    seaf.count(file_path, len(chunk))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if pos < stop:  # cut on purpose, or short file: drop the connection mid-body
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- lab control
    def _read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def lab_add_faults(self):
        try:
            rules = self._read_json()
            if isinstance(rules, dict):
                rules = [rules]
            self._json(200, {"faults": self.seaf.add_faults(rules)})
        except (ValueError, TypeError) as err:
            self._json(400, {"error_msg": str(err)})

    def lab_faults(self):
        with self.seaf.lock:
            self._json(200, {"faults": [dict(r) for r in self.seaf.faults]})

    def lab_clear_faults(self):
        self.seaf.clear_faults()
        self._json(200, {"faults": []})

    def lab_expire(self):
        self.seaf.expire_tokens()
        self._json(200, {"expired": True})

    def lab_stats(self):
        self._json(200, self.seaf.stats())

    def lab_reset_stats(self):
        self.seaf.reset_stats()
        self._json(200, self.seaf.stats())


def _pairs(values, flag):
    table = {}
    for value in values or ():
        token, sep, path = value.partition("=")
        if not sep or not token or not path:
            raise SystemExit(f"{flag} wants TOKEN=PATH, got {value!r}")
        table[token] = path
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.seafile",
                                     description="Seafile share-link stand-in (127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port and prints it")
    parser.add_argument("--share", action="append", metavar="TOKEN=DIR")
    parser.add_argument("--file-share", action="append", metavar="TOKEN=FILEPATH")
    parser.add_argument("--password-share", action="append", metavar="TOKEN=DIR")
    parser.add_argument("--token-ttl", type=float, default=3600)
    parser.add_argument("--pidfile")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        standin = SeafileStandIn(_pairs(args.share, "--share"),
                                 _pairs(args.file_share, "--file-share"),
                                 _pairs(args.password_share, "--password-share"),
                                 port=args.port, token_ttl=args.token_ttl, verbose=args.verbose)
    except ValueError as err:
        raise SystemExit(str(err))
    wait_for_signal(standin.start(), args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
