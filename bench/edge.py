"""Driver for bench/edge.sh (stdlib only)."""
import os, shutil, statistics, sys, tempfile

import benchlib
from benchlib import Agent, free_port, kiln_quiet, wait_port

KILN, HELLO = sys.argv[1:3]
BASELINE = os.environ.get("BASELINE")
RUNS = int(os.environ.get("RUNS", "5"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNS", "50"))


def service(name, port, route=""):
    return f"""
[services.{name}]
image = "hello"
listen = "127.0.0.1:{port}"
{route}
env = {{ HELLO_VERSION = "{name}" }}
[services.{name}.health.readiness]
http = "/healthz"
"""


def deploy(kiln, home, app, spec):
    os.makedirs(f"{app}/bin")
    shutil.copy(HELLO, f"{app}/bin/hello")
    with open(f"{app}/kiln.toml", "w") as f:
        f.write('[images.hello]\ninclude = ["bin"]\nentrypoint = ["/bin/hello"]\n' + spec)
    kiln_quiet(kiln, home, "apply", "-f", f"{app}/kiln.toml")


def body(port, host, path):
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


work = tempfile.mkdtemp(prefix="kiln-bench-edge-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
agents = []
try:
    plain, shared = free_port(), free_port()
    agents.append(Agent(KILN, f"{work}/home"))
    deploy(KILN, f"{work}/home", f"{work}/app", service("plain", plain) + "".join([
        service("site", shared, 'hosts = ["example.test"]'),
        service("api", shared, 'hosts = ["example.test"]\npath_prefix = "/api"\nstrip_prefix = true'),
        service("tenants", shared, 'hosts = ["*.example.test"]'),
        service("rest", shared),
    ]))
    # name -> (port, host, path)
    targets = {
        "kiln, listen alone": (plain, None, "/"),
        "kiln, shared by host+prefix": (shared, "example.test", "/api/"),
    }
    if BASELINE:
        base = free_port()
        agents.append(Agent(BASELINE, f"{work}/home-base"))
        deploy(BASELINE, f"{work}/home-base", f"{work}/app-base", service("plain", base))
        targets["baseline kiln, listen alone"] = (base, None, "/")
    for name, (port, host, path) in targets.items():
        wait_port(port)
        got = body(port, host or "x", path)
        want = "api" if "shared" in name else "plain"
        if not got.startswith(f"hello from {want} "):
            sys.exit(f"{name}: unexpected answer {got!r}")
        benchlib.wrk(port, CONNS, 2, path, host)  # warm-up
    runs = {name: [] for name in targets}
    for _ in range(RUNS):
        for name, (port, host, path) in targets.items():
            rps, p50, p99, total, non2xx, sock = benchlib.wrk(port, CONNS, DURATION, path, host)
            if non2xx or sock:
                sys.exit(f"{name}: {non2xx} non-2xx, {sock} socket errors")
            runs[name].append((rps, p50, p99))
finally:
    for a in agents:
        a.stop()
    shutil.rmtree(work, ignore_errors=True)

print(f"\nmachine: {os.cpu_count()} cores; wrk -t2 -c{CONNS} -d{DURATION}s; medians of {RUNS} interleaved runs; backend: one examples/hello instance per service\n")
print(f"{'(1) plain HTTP/1.1':<32} {'requests/s':>12} {'p50 ms':>8} {'p99 ms':>8}")
for name, rs in runs.items():
    med = [statistics.median(r[i] for r in rs) for i in range(3)]
    print(f"{name:<32} {med[0]:>12.0f} {med[1]:>8.2f} {med[2]:>8.2f}")
ref = "kiln, listen alone"
for other in runs:
    if other == ref:
        continue
    rps = [a[0] / b[0] for a, b in zip(runs[other], runs[ref])]
    p99 = [a[2] / b[2] for a, b in zip(runs[other], runs[ref])]
    print(f"{other} vs {ref}, run by run: requests/s x{statistics.median(rps):.3f}, p99 x{statistics.median(p99):.3f}")
