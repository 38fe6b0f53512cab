"""Driver for bench/traffic.sh (stdlib only)."""
import json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

import benchlib
from benchlib import free_port, pct, wait_port

KILN, HELLO, BENCH = sys.argv[1:4]
RUNS = int(os.environ.get("RUNS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNS", "50"))
ROLLBACKS = int(os.environ.get("ROLLBACKS", "20"))


def wrk(port, duration=DURATION, path="/"):
    return benchlib.wrk(port, CONNS, duration, path)


def get_body(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def api_rollback(sock, service):
    """`POST /v1/services/SERVICE/rollback` on the agent's socket, as the
    CLI sends it, without starting a process: the agent's own share."""
    body = b'{"to":null}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        s.sendall(
            f"POST /v1/services/{service}/rollback HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
        )
        while s.recv(4096):
            pass


work = tempfile.mkdtemp(prefix="kiln-bench-traffic-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
home, app = f"{work}/home", f"{work}/app"
port, preview = free_port(), free_port()
os.makedirs(f"{app}/bin")
shutil.copy(HELLO, f"{app}/bin/hello")


def write_spec(version, replicas=1):
    with open(f"{app}/kiln.toml", "w") as f:
        f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
replicas = {replicas}
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "{version}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "250ms"
[services.web.rollout]
strategy = "blue-green"
preview_listen = "127.0.0.1:{preview}"
scale_down_delay = "10m"
""")


def kiln(*args):
    return subprocess.run([KILN, "--home", home, *args], cwd=app, check=True, capture_output=True, text=True).stdout


agent = subprocess.Popen([KILN, "--home", home, "serve"], stderr=subprocess.DEVNULL)
procs = []
try:
    while not os.path.exists(f"{home}/kiln.sock"):
        time.sleep(0.01)
    write_spec("v1")
    kiln("apply")
    st = json.loads(kiln("status", "--json"))["services"][0]
    backend = st["instances"][0]["port"]

    # (1) the same backend behind each proxy.
    ng_port, ha_port = free_port(), free_port()
    for name, port_, tmpl in [("nginx", ng_port, "nginx.conf.in"), ("haproxy", ha_port, "haproxy.cfg.in")]:
        conf = open(f"{BENCH}/{tmpl}").read().replace("@PORT@", str(port_)).replace("@BACKEND@", f"127.0.0.1:{backend}").replace("@DIR@", work)
        path = f"{work}/{tmpl[:-3]}"
        open(path, "w").write(conf)
    procs.append(subprocess.Popen(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"], stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["haproxy", "-f", f"{work}/haproxy.cfg"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    for p in (ng_port, ha_port):
        wait_port(p)
    targets = [("direct to the backend", backend), ("nginx", ng_port), ("HAProxy", ha_port), ("kiln router", port)]
    runs = {name: [] for name, _ in targets}
    # Alternated, so a noisy stretch of the machine hits every proxy alike,
    # and the order turns each round so that none always goes first.
    for k in range(RUNS):
        for name, p in targets[k % len(targets):] + targets[:k % len(targets)]:
            runs[name].append(wrk(p))
    rows = {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}

    # (2) warm rollbacks: first on an idle machine, then under load.
    write_spec("v1", replicas=3)
    kiln("apply")
    version = [1]

    def rollbacks():
        """ROLLBACKS by the CLI (a process started, as a person runs it)
        and as many by the API on the socket (the agent's own share),
        alternated: their times in ms."""
        times, api_times = [], []
        for k in range(2 * ROLLBACKS):
            version[0] += 1
            write_spec(f"v{version[0]}", replicas=3)
            kiln("apply")  # a fresh green fleet, promoted; the old one stays warm
            before = get_body(port)
            t0 = time.perf_counter()
            if k % 2 == 0:
                rb = subprocess.Popen([KILN, "--home", home, "rollback", "web", "--detach"], cwd=app, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                rb = None
                threading.Thread(target=api_rollback, args=(f"{home}/kiln.sock", "web")).start()
            while get_body(port).split(" (")[0] == before.split(" (")[0]:
                time.sleep(0.0002)
            (times if rb else api_times).append((time.perf_counter() - t0) * 1000)
            if rb:
                rb.wait()
            kiln("rollout", "status", "web")
        return sorted(times), sorted(api_times)

    idle_times, idle_api_times = rollbacks()
    load = {}
    t = threading.Thread(target=lambda: load.update(r=wrk(port, duration=max(30, ROLLBACKS * 8))))
    t.start()
    times, api_times = rollbacks()
    # The load must cover every rollback, or its count of failed requests
    # says nothing about the last ones.
    if not t.is_alive():
        sys.exit("the load ended before the last rollback: its counts would not cover them (fewer ROLLBACKS)")
    t.join()
    total, non2xx, sock = load["r"][3:6]
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait()
    agent.send_signal(signal.SIGTERM)
    agent.wait()
    shutil.rmtree(work, ignore_errors=True)

print(f"\nmachine: {os.cpu_count()} cores; wrk -t2 -c{CONNS} -d{DURATION}s; medians of {RUNS} runs; backend: one examples/hello instance run by kiln (sandbox)\n")
print(f"{'(1) proxy':<28} {'requests/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'vs best of nginx/HAProxy':>26}")
best = max(rows["nginx"][0], rows["HAProxy"][0])
for name, (rps, p50, p99) in rows.items():
    print(f"{name:<28} {rps:>12.0f} {p50:>8.2f} {p99:>8.2f} {rps / best:>25.2f}x")
# Run by run: the k-th runs of two proxies were close in time.
for peer in ("HAProxy", "nginx"):
    rps = [a[0] / b[0] for a, b in zip(runs["kiln router"], runs[peer])]
    p99 = [a[2] / b[2] for a, b in zip(runs["kiln router"], runs[peer])]
    print(f"kiln vs {peer}, run by run: requests/s x{statistics.median(rps):.2f} (ahead in {sum(r > 1 for r in rps)}/{RUNS}), "
          f"p99 x{statistics.median(p99):.2f} (lower in {sum(r < 1 for r in p99)}/{RUNS})")
print(f"\n(2) warm rollback (blue-green, 3 replicas), command to first response from the old release, over {ROLLBACKS}:")
for when, cli, api in [("on an idle machine", idle_times, idle_api_times), (f"under wrk -c{CONNS} (both cores busy)", times, api_times)]:
    print(f"  {when}:")
    print(f"    by the CLI: p50 {pct(cli, 50):.1f} ms, p99 {pct(cli, 99):.1f} ms (includes starting the kiln CLI process)")
    print(f"    by the API on the socket: p50 {pct(api, 50):.1f} ms, p99 {pct(api, 99):.1f} ms (the agent's share)")
print(f"  under wrk meanwhile: {total} requests, {non2xx} non-2xx, {sock} socket errors")
print("(3) canary abort: see bench/canary.sh")
