"""The control cache as a web seed for a swarm run: files of one folder over HTTP, with Range.

    python3 webseed.py ADDRESS PORT TOKEN FOLDER

Serves FOLDER/<name>/<file> at http://ADDRESS:PORT/TOKEN/<name>/<file> (GET and HEAD, one
byte range per request, as aria2 asks a web seed) and answers 404 to every other path: the
random TOKEN is the run's secret, known only to the hosts of the run (it is on their aria2c
command line, not in the torrent). Bound to ADDRESS only; standard library only; the body is
sent with sendfile(2), so the server costs no copy through Python.
"""

import os
import re
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    folder = token = ""

    def log_message(self, *args):
        pass

    def _file(self):
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).split("/")
        # /TOKEN/<name>/<file>: nothing else, no dot segments
        if len(parts) != 4 or parts[0] or parts[1] != self.token or \
                any(p in ("", ".", "..") for p in parts[2:]):
            return None
        path = os.path.join(self.folder, parts[2], parts[3])
        return path if os.path.isfile(path) else None

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start, end, code = 0, size - 1, 200
            header = self.headers.get("Range")
            if header:
                m = RANGE.match(header.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    self.send_error(416)
                    return
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(size - int(m.group(2)), 0)
                if start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                code = 206
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            self.wfile.flush()
            offset, left = start, end - start + 1
            while left:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, min(left, 1 << 24))
                if not sent:
                    break
                offset += sent
                left -= sent


def main(argv=None) -> int:
    address, port, token, folder = (argv or sys.argv[1:])[:4]
    Handler.folder, Handler.token = folder, token
    server = ThreadingHTTPServer((address, int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
