"""Driver for bench/soak.sh (stdlib only).

One agent, one service of one replica behind the router, ROLLOUTS rollouts
(a changed env var each: a new release, a rolling update), a request every
few milliseconds meanwhile. Every STEP rollouts: the agent process's RSS
(VmRSS; the agent, not its supervisor), the lines of /metrics, and the
requests that failed so far. Flat RSS and /metrics over the run are the goal.
"""
import os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

from benchlib import free_port, wait_port

KILN, HELLO = sys.argv[1], sys.argv[2]
ROLLOUTS = int(os.environ.get("ROLLOUTS", "500"))
STEP = int(os.environ.get("STEP", "50"))
# Seconds between rollouts: the series of a release nothing routes to go a
# minute (a scrape window) after, so a run must outlast that to show them go.
PAUSE = float(os.environ.get("PAUSE", "0.2"))

work = tempfile.mkdtemp(prefix="kiln-bench-soak-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
home, app = f"{work}/home", f"{work}/app"
os.makedirs(f"{app}/bin")
shutil.copy(HELLO, f"{app}/bin/hello")
port, metrics = free_port(), free_port()


def write_spec(version):
    with open(f"{app}/kiln.toml", "w") as f:
        f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
listen = "127.0.0.1:{port}"
env = {{ HELLO_VERSION = "v{version}" }}
[services.web.health.readiness]
http = "/healthz"
interval = "100ms"
[services.web.rollout]
watch = "0s"
[services.web.stop]
drain_timeout = "0s"
""")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metrics_lines():
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        return len(r.read().decode().splitlines())


stop = threading.Event()
counts = {"ok": 0, "failed": 0}


def load():
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                counts["ok" if r.status == 200 else "failed"] += 1
        except Exception:
            counts["failed"] += 1
        time.sleep(0.005)


agent = subprocess.Popen([KILN, "--home", home, "serve", "--metrics", f"127.0.0.1:{metrics}"],
                         stderr=subprocess.DEVNULL)
try:
    while not os.path.exists(f"{home}/kiln.sock"):
        time.sleep(0.01)
    write_spec(0)
    subprocess.run([KILN, "--home", home, "apply"], cwd=app, check=True, capture_output=True)
    wait_port(port)
    pid = int(open(f"{home}/agent.lock").read().strip())
    t = threading.Thread(target=load)
    t.start()
    print(f"{'rollouts':>9} {'agent RSS MiB':>14} {'open fds':>9} {'/metrics lines':>15} {'requests':>10} {'failed':>7}")
    started = time.time()
    for k in range(1, ROLLOUTS + 1):
        write_spec(k)
        subprocess.run([KILN, "--home", home, "apply"], cwd=app, check=True, capture_output=True)
        time.sleep(PAUSE)
        if k % STEP == 0 or k == 1:
            print(f"{k:>9} {rss_kib(pid) / 1024:>14.1f} {len(os.listdir(f'/proc/{pid}/fd')):>9} {metrics_lines():>15} "
                  f"{counts['ok'] + counts['failed']:>10} {counts['failed']:>7}", flush=True)
    stop.set()
    t.join()
    print(f"\n{ROLLOUTS} rollouts in {time.time() - started:.0f} s; machine: {os.cpu_count()} cores")
finally:
    stop.set()
    agent.send_signal(signal.SIGTERM)
    agent.wait()
    shutil.rmtree(work, ignore_errors=True)
