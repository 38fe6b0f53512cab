"""Driver for bench/edge.sh (stdlib only)."""
import json, os, shutil, statistics, subprocess, sys, tempfile

import benchlib
from benchlib import Agent, free_port, kiln_quiet, wait_port

KILN, HELLO, BENCH = sys.argv[1:4]
BASELINE = os.environ.get("BASELINE")
RUNS = int(os.environ.get("RUNS", "5"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNS", "50"))
STREAMS = int(os.environ.get("STREAMS", "10"))
# ONLY=plain: section (1) alone (an A/B of the plain path with BASELINE).
ONLY = os.environ.get("ONLY")


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


def h2load(name, port, duration):
    """h2load over TLS (ALPN h2): requests/s and mean ms; exits on errors."""
    out = subprocess.run(["h2load", "-t", "2", "-c", str(CONNS), "-m", str(STREAMS), "-D", str(duration),
                          f"https://127.0.0.1:{port}/"], check=True, capture_output=True, text=True).stdout
    if "Application protocol: h2" not in out:
        sys.exit(f"h2load on {name}: not HTTP/2:\n{out}")
    rps = float(out.split(" req/s")[0].rsplit(", ", 1)[1])
    req = out.split("requests: ")[1].split("\n")[0]
    failed = int(req.split(" failed")[0].rsplit(", ", 1)[1]) + int(req.split(" errored")[0].rsplit(", ", 1)[1])
    if failed:
        sys.exit(f"h2load on {name}: {req}")
    mean = out.split("time for request:")[1].split()[2]
    ms = float(mean[:-2]) if mean.endswith("ms") else float(mean[:-2]) / 1000 if mean.endswith("us") else float(mean[:-1]) * 1000
    return rps, ms


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
    plain, shared, https = free_port(), free_port(), free_port()
    agents.append(Agent(KILN, f"{work}/home"))
    # One ECDSA P-256 certificate for kiln, nginx and HAProxy alike.
    cert, key, pem = f"{work}/cert.pem", f"{work}/key.pem", f"{work}/both.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"], check=True, capture_output=True)
    with open(pem, "w") as f:
        f.write(open(cert).read() + open(key).read())
    deploy(KILN, f"{work}/home", f"{work}/app", service("plain", plain) + service("secure", https)
           + f'[services.secure.tls]\ncert = "{cert}"\nkey = "{key}"\n' + "".join([
        service("site", shared, 'hosts = ["example.test"]'),
        service("api", shared, 'hosts = ["example.test"]\npath_prefix = "/api"\nstrip_prefix = true'),
        service("tenants", shared, 'hosts = ["*.example.test"]'),
        service("rest", shared),
    ]))
    status = json.loads(subprocess.run([KILN, "--home", f"{work}/home", "status", "--json"],
                                       check=True, capture_output=True, text=True).stdout)
    backend = next(s["instances"][0]["port"] for s in status["services"] if s["name"] == "secure")
    ng, ha = free_port(), free_port()
    for name, port_, tmpl in [("nginx", ng, "nginx-tls.conf.in"), ("haproxy", ha, "haproxy-tls.cfg.in")]:
        conf = open(f"{BENCH}/{tmpl}").read()
        for k, v in {"@PORT@": port_, "@BACKEND@": f"127.0.0.1:{backend}", "@DIR@": work,
                     "@CERT@": cert, "@KEY@": key, "@PEM@": pem}.items():
            conf = conf.replace(k, str(v))
        open(f"{work}/{tmpl[:-3]}", "w").write(conf)
    peers = [subprocess.Popen(["nginx", "-c", f"{work}/nginx-tls.conf", "-g", "daemon off;"], stderr=subprocess.DEVNULL),
             subprocess.Popen(["haproxy", "-f", f"{work}/haproxy-tls.cfg"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)]
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
    keep, fresh, h2 = {}, {}, {}
    if ONLY != "plain":
        # (2) HTTPS: keep-alive requests, and new connections (each a full
        # handshake: `Connection: close` on every request), the same backend
        # behind each proxy, the order turning each round.
        tls_targets = [("kiln", https), ("nginx", ng), ("HAProxy", ha)]
        for _, port in tls_targets:
            wait_port(port)
            benchlib.wrk(port, CONNS, 2, "/", None, "https")
        keep = {n: [] for n, _ in tls_targets}
        fresh = {n: [] for n, _ in tls_targets}
        for k in range(RUNS):
            for name, port in tls_targets[k % 3:] + tls_targets[:k % 3]:
                r = benchlib.wrk(port, CONNS, DURATION, "/", None, "https")
                if r[4] or r[5]:
                    sys.exit(f"{name} (https): {r[4]} non-2xx, {r[5]} socket errors")
                keep[name].append(r[:3])
                r = benchlib.wrk(port, CONNS, DURATION, "/", None, "https", close=True)
                if r[4]:
                    sys.exit(f"{name} (handshakes): {r[4]} non-2xx")
                fresh[name].append(r[:3])
        # (3) HTTP/2 over TLS: h2load, CONNS connections, STREAMS streams at
        # once on each.
        for name, port in tls_targets:
            h2load(name, port, 2)
        h2 = {n: [] for n, _ in tls_targets}
        for k in range(RUNS):
            for name, port in tls_targets[k % 3:] + tls_targets[:k % 3]:
                h2[name].append(h2load(name, port, DURATION))
finally:
    for p in locals().get("peers", []):
        p.terminate()
        p.wait()
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

if ONLY != "plain":
    print(f"\n(2) HTTPS, one ECDSA P-256 certificate, TLS 1.3 (wrk's OpenSSL), same backend")
    for title, table in [("keep-alive requests", keep), ("new connections, a handshake each", fresh)]:
        print(f"{title:<34} {'per second':>12} {'p50 ms':>8} {'p99 ms':>8}")
        for name, rs in table.items():
            med = [statistics.median(r[i] for r in rs) for i in range(3)]
            print(f"  {name:<32} {med[0]:>12.0f} {med[1]:>8.2f} {med[2]:>8.2f}")
        for peer in ("nginx", "HAProxy"):
            rps = [a[0] / b[0] for a, b in zip(table["kiln"], table[peer])]
            p99 = [a[2] / b[2] for a, b in zip(table["kiln"], table[peer])]
            print(f"  kiln vs {peer}, run by run: x{statistics.median(rps):.2f} per second, p99 x{statistics.median(p99):.2f}")

    print(f"\n(3) HTTP/2 over TLS (h2load -t2 -c{CONNS} -m{STREAMS} -D{DURATION}), same backend over HTTP/1.1")
    print(f"{'':<34} {'requests/s':>12} {'mean ms':>8}")
    for name, rs in h2.items():
        print(f"  {name:<32} {statistics.median(r[0] for r in rs):>12.0f} {statistics.median(r[1] for r in rs):>8.2f}")
    for peer in ("nginx", "HAProxy"):
        rps = [a[0] / b[0] for a, b in zip(h2["kiln"], h2[peer])]
        lat = [a[1] / b[1] for a, b in zip(h2["kiln"], h2[peer])]
        print(f"  kiln vs {peer}, run by run: x{statistics.median(rps):.2f} requests/s, mean latency x{statistics.median(lat):.2f}")
