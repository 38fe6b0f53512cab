"""Driver for bench/restart.sh (stdlib only)."""
import json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

from benchlib import free_port, pct, to_ms

KILN, HELLO, BENCH = sys.argv[1], sys.argv[2], sys.argv[3]
REPS = int(os.environ.get("REPS", "20"))
DURATION = int(os.environ.get("DURATION", "2"))
CONNS = int(os.environ.get("CONNS", "50"))

work = tempfile.mkdtemp(prefix="kiln-bench-restart-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
home, app = f"{work}/home", f"{work}/app"
port = free_port()
os.makedirs(f"{app}/bin")
shutil.copy(HELLO, f"{app}/bin/hello")
# kiln serve runs from a copy that the upgrade replaces.
exe = f"{work}/kiln"
shutil.copy(KILN, exe)
with open(f"{app}/kiln.toml", "w") as f:
    f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
replicas = 3
listen = "127.0.0.1:{port}"
[services.web.health.readiness]
http = "/healthz"
interval = "250ms"
""")


def kiln(*args):
    return subprocess.run([KILN, "--home", home, *args], cwd=app, check=True, capture_output=True, text=True).stdout


def api_status():
    """GET /v1/status on the agent's socket, or None."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(f"{home}/kiln.sock")
            s.sendall(b"GET /v1/status HTTP/1.1\r\nhost: kiln\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        if b" 200 " not in head.split(b"\r\n")[0]:
            return None
        if b"transfer-encoding: chunked" in head.lower():
            out, rest = b"", body
            while True:
                size, rest = rest.split(b"\r\n", 1)
                n = int(size, 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            body = out
        return json.loads(body)
    except (OSError, ValueError):
        return None


def agent_pid():
    s = api_status()
    return s["agent"]["pid"] if s else None


def until_new_agent(old):
    t0 = time.perf_counter()
    while True:
        p = agent_pid()
        if p is not None and p != old:
            return time.perf_counter() - t0
        time.sleep(0.001)


def wrk_during(port, action):
    """One wrk run; `action` runs 1/3 of the way in: (failed, max ms, requests)."""
    out = {}

    def run():
        out["text"] = subprocess.run(["wrk", "-t2", f"-c{CONNS}", f"-d{DURATION}s", "--latency", f"http://127.0.0.1:{port}/"],
                                     capture_output=True, text=True, check=True).stdout
    t = threading.Thread(target=run)
    t.start()
    time.sleep(DURATION / 3)
    extra = action()
    t.join()
    text = out["text"]
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0
    sock = sum(map(int, m.groups())) if (m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)) else 0
    mx = to_ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    return non2xx + sock, mx, total, extra


def build(n):
    """Another build of kiln: its build id stamped with n."""
    data = open(KILN, "rb").read()
    stamp = b"kiln-build-id:" + f"{n:016d}".encode()
    data = data.replace(b"kiln-build-id:0000000000000000", stamp, 1)
    tmp = exe + ".new"
    open(tmp, "wb").write(data)
    os.chmod(tmp, 0o755)
    os.rename(tmp, exe)


serve = subprocess.Popen([exe, "--home", home, "serve"], stderr=subprocess.DEVNULL)
nginx = None
try:
    while agent_pid() is None:
        time.sleep(0.01)
    kiln("apply")
    pids = {i["pid"] for i in json.loads(kiln("status", "--json"))["services"][0]["instances"]}
    backend = json.loads(kiln("status", "--json"))["services"][0]["instances"][0]["port"]

    def restart():
        old = agent_pid()
        serve.send_signal(signal.SIGHUP)
        return until_new_agent(old)

    builds = iter(range(1, 10**6))

    def upgrade():
        build(next(builds))
        return restart()

    def crash():
        old = agent_pid()
        os.kill(old, signal.SIGKILL)
        return until_new_agent(old)

    # nginx in front of the same backend, reloaded the same way.
    ng_port = free_port()
    conf = open(f"{BENCH}/nginx.conf.in").read().replace("@PORT@", str(ng_port)).replace("@BACKEND@", f"127.0.0.1:{backend}").replace("@DIR@", work)
    open(f"{work}/nginx.conf", "w").write(conf)
    nginx = subprocess.Popen(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)

    def nginx_reload():
        nginx.send_signal(signal.SIGHUP)
        return 0.0

    print(f"machine: {os.cpu_count()} cores; wrk -t2 -c{CONNS} -d{DURATION}s per repetition; {REPS} repetitions each")
    print(f"{'event':<28}{'failed (sum)':>14}{'reps failing':>14}{'gap p50 ms':>12}{'gap max ms':>12}{'takeover p50/p99 ms':>22}")
    # The baselines: the same runs with nothing happening (this machine's
    # own latency tail is part of every "gap").
    def nothing():
        return 0.0

    for name, p, action in [("kiln, nothing happens", port, nothing), ("kiln restart (SIGHUP)", port, restart),
                            ("kiln upgrade (new build)", port, upgrade), ("kiln agent kill -9", port, crash),
                            ("nginx, nothing happens", ng_port, nothing), ("nginx reload (SIGHUP)", ng_port, nginx_reload)]:
        failed, gaps, takeovers = [], [], []
        for _ in range(REPS):
            f, mx, _total, extra = wrk_during(p, action)
            failed.append(f)
            gaps.append(mx)
            takeovers.append(extra * 1000)
        tk = f"{pct(takeovers, 50):.1f}/{pct(takeovers, 99):.1f}" if action not in (nothing, nginx_reload) else "-"
        print(f"{name:<28}{sum(failed):>14}{sum(1 for f in failed if f):>14}{statistics.median(gaps):>12.1f}{max(gaps):>12.1f}{tk:>22}")
    now = {i["pid"] for i in json.loads(kiln("status", "--json"))["services"][0]["instances"]}
    print(f"instances kept through all of it: {'yes' if now == pids else 'NO'} ({len(pids)} pids)")
finally:
    if nginx:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait()
    serve.send_signal(signal.SIGTERM)
    serve.wait()
    shutil.rmtree(work, ignore_errors=True)
