#!/usr/bin/env python3
"""Calls per second to the agent's API, by one client for both transports:
keep-alive HTTP/1.1 connections, 4 threads, each making CALLS/4 requests.

  apiload.py tls HOST:PORT PATH TOKEN CALLS    # TLS, Authorization: Bearer
  apiload.py unix SOCKET PATH TOKEN CALLS      # the Unix socket (no token)

Prints calls/s (every answer must be 200)."""
import http.client
import socket
import ssl
import sys
import threading
import time

via, where, path, token, calls = sys.argv[1:6]
calls = int(calls)
THREADS = 4


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, sock_path):
        super().__init__("kiln")
        self.sock_path = sock_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.sock_path)


def connection():
    if via == "tls":
        host, port = where.rsplit(":", 1)
        ctx = ssl.create_default_context()
        # The bench measures the transport; kiln's client pins the certificate.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, int(port), context=ctx)
    return UnixConnection(where)


failed = []


def worker(n):
    c = connection()
    headers = {"authorization": f"Bearer {token}"} if via == "tls" else {}
    for _ in range(n):
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            failed.append(r.status)
    c.close()


threads = [threading.Thread(target=worker, args=(calls // THREADS,)) for _ in range(THREADS)]
start = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
took = time.perf_counter() - start
if failed:
    sys.exit(f"{len(failed)} calls failed: {sorted(set(failed))}")
print(f"{calls // THREADS * THREADS / took:.0f}")
