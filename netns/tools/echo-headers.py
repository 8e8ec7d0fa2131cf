#!/usr/bin/env python3
"""An HTTP backend for the proxy tests: answers every GET with one line,
MARK path=... xff=... xfp=... xfh=... fwd=... auth=... user=..., the
forwarding headers it received (None when absent).

    echo-headers.py ADDRESS PORT MARK     (ADDRESS: IPv6)
"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARK = sys.argv[3]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        h = self.headers
        body = ("%s path=%s xff=%s xfp=%s xfh=%s fwd=%s auth=%s user=%s\n" % (
            MARK, self.path, h.get("X-Forwarded-For"), h.get("X-Forwarded-Proto"),
            h.get("X-Forwarded-Host"), h.get("Forwarded"), h.get("Authorization"),
            h.get("X-Auth-Request-User"))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("backend: " + (fmt % args) + "\n")

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6

S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
