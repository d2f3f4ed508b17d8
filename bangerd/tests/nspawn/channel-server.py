#!/usr/bin/env python3
"""A release channel on loopback for package-update.sh.

    channel-server.py PORT ROOT

Serves ROOT as it is, and the channel ROOT/good two broken ways: under
/truncated/ an artifact's body stops halfway (after a Content-Length for
all of it) and the connection closes; under /hang/ an artifact's headers
and first bytes arrive, then nothing more. Manifests come whole.
"""
import http.server
import os
import sys
import time

PORT, ROOT = int(sys.argv[1]), sys.argv[2]


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=ROOT, **kwargs)

    def do_GET(self):
        for broken in ("/truncated/", "/hang/"):
            if self.path.startswith(broken):
                self.path = "/good/" + self.path[len(broken):]
                if "manifest" not in self.path:
                    return self.broken(broken)
        return super().do_GET()

    def broken(self, how):
        path = self.translate_path(self.path)
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            if how == "/hang/":
                self.wfile.write(f.read(4096))
                self.wfile.flush()
                time.sleep(3600)
                return
            left = size // 2
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)
        self.close_connection = True


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
