"""Driver for bench/cluster.sh (stdlib only)."""
import json, os, shutil, signal, subprocess, sys, tempfile, time

from benchlib import free_port, pct

KILN, HELLO, BENCH = sys.argv[1:4]
KILLS = int(os.environ.get("KILLS", "10"))
TTL = 5.0

work = tempfile.mkdtemp(prefix="kiln-bench-cluster-")
os.chmod(work, 0o711)
app = f"{work}/app"
os.makedirs(f"{app}/bin")
shutil.copy(HELLO, f"{app}/bin/hello")
with open(f"{app}/bin/start.sh", "w") as f:
    f.write("#!/usr/bin/sh\nexec ./bin/hello\n")
os.chmod(f"{app}/bin/start.sh", 0o755)
with open(f"{app}/kiln.toml", "w") as f:
    f.write("""
[images.app]
include = ["bin"]
entrypoint = ["/bin/start.sh"]

[services.web]
image = "app"
replicas = 3
env = { HELLO_VERSION = "v1" }
[services.web.health.readiness]
http = "/healthz"
interval = "200ms"
[services.web.rollout]
# No release kept warm beside the new one: the count is of one fleet.
watch = "0s"
""")

client, peer = free_port(), free_port()
etcd_url = f"http://127.0.0.1:{client}"
etcd = subprocess.Popen(
    ["etcd", "--data-dir", f"{work}/etcd", "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
     "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
     "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--log-level", "error"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ctl(*args):
    return subprocess.run(["etcdctl", "--endpoints", etcd_url, *args], env={**os.environ, "ETCDCTL_API": "3"},
                          capture_output=True, text=True).stdout


def home(n):
    return f"{work}/h{n}"


def kiln(n, *args):
    return subprocess.run([KILN, *args], env={**os.environ, "KILN_HOME": home(n)}, cwd=app,
                          capture_output=True, text=True, check=True).stdout


agents = {}


def start(n):
    agents[n] = subprocess.Popen([KILN, "serve", "--etcd", etcd_url, "--node", f"n{n}"],
                                 env={**os.environ, "KILN_HOME": home(n)}, stdout=subprocess.DEVNULL,
                                 stderr=open(f"{work}/agent{n}.log", "a"))
    while not os.path.exists(f"{home(n)}/kiln.sock"):
        time.sleep(0.01)


def status(n):
    try:
        return json.loads(kiln(n, "status", "--json"))
    except subprocess.CalledProcessError:
        return {"services": []}


def ready(n):
    """This node's ready instances of the service's current release."""
    return sum(1 for s in status(n)["services"] for i in s["instances"]
               if i["ready"] and i["state"] == "running" and i["revision"] == s["revision"])


def leader():
    return ctl("get", "--print-value-only", "/kiln/leader").strip()


def wait(what, cond, limit=120):
    deadline = time.time() + limit
    while not cond():
        if time.time() > deadline:
            # What each node says, and the end of its log, for the report.
            for n in (1, 2, 3):
                print(f"== n{n}:", file=sys.stderr)
                try:
                    print(kiln(n, "status"), file=sys.stderr)
                except subprocess.CalledProcessError as e:
                    print(e.stderr, file=sys.stderr)
                with open(f"{work}/agent{n}.log") as f:
                    print("".join(f.readlines()[-15:]), file=sys.stderr)
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.02)


try:
    wait("etcd", lambda: subprocess.run(["etcdctl", "--endpoints", etcd_url, "endpoint", "health"],
                                        env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True).returncode == 0, 30)
    for n in (1, 2, 3):
        start(n)
        kiln(n, "bake")
    wait("three members", lambda: len([l for l in ctl("get", "--prefix", "--keys-only", "/kiln/nodes/").split() if l]) == 3)
    kiln(1, "apply", "--detach")
    wait("three ready", lambda: sum(ready(n) for n in (1, 2, 3)) == 3)
    times = []
    for k in range(KILLS):
        lead = int(leader().lstrip("n"))
        victim = next(n for n in (1, 2, 3) if n != lead and ready(n) > 0)
        st = status(victim)
        pids = [i["pid"] for s in st["services"] for i in s["instances"] if i.get("pid")]
        t0 = time.perf_counter()
        # The supervisor frozen first (it would start another agent), then
        # the agent, each instance's process group, the supervisor.
        os.kill(agents[victim].pid, signal.SIGSTOP)
        for kill in [lambda: os.kill(st["agent"]["pid"], signal.SIGKILL)] + \
                [lambda p=p: os.killpg(p, signal.SIGKILL) for p in pids] + \
                [lambda p=p: os.kill(p, signal.SIGKILL) for p in pids] + \
                [lambda: os.kill(agents[victim].pid, signal.SIGKILL)]:
            try:
                kill()
            except ProcessLookupError:
                pass
        # A sandbox's pid-1 reaper is in a session of its own: whatever
        # names the home goes too (its pid namespace with it).
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if home(victim).encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        agents[victim].wait()
        others = [n for n in (1, 2, 3) if n != victim]
        wait("the slots healed", lambda: sum(ready(n) for n in others) >= 3)
        times.append(time.perf_counter() - t0)
        # The node comes back (a new agent on its home, once its lease is gone).
        wait("its lease gone", lambda: f"/kiln/nodes/n{victim}" not in ctl("get", "--prefix", "--keys-only", "/kiln/nodes/"))
        start(victim)
        wait("a member again", lambda: f"/kiln/nodes/n{victim}" in ctl("get", "--prefix", "--keys-only", "/kiln/nodes/"))
        # Spread again for the next kill: a new release places one per node.
        with open(f"{app}/kiln.toml") as f:
            spec = f.read()
        with open(f"{app}/kiln.toml", "w") as f:
            f.write(spec.replace(f'HELLO_VERSION = "v{k + 1}"', f'HELLO_VERSION = "v{k + 2}"'))
        kiln(lead, "apply")
        wait("spread again", lambda: all(ready(n) >= 1 for n in (1, 2, 3)) and sum(ready(n) for n in (1, 2, 3)) >= 3)
finally:
    for a in agents.values():
        if a.poll() is None:
            a.send_signal(signal.SIGTERM)
    for a in agents.values():
        try:
            a.wait(timeout=30)
        except subprocess.TimeoutExpired:
            a.kill()
    etcd.send_signal(signal.SIGTERM)
    etcd.wait()
    shutil.rmtree(work, ignore_errors=True)

times.sort()
print(f"\nmachine: {os.cpu_count()} cores; 3 agents and etcd on it; lease TTL {TTL:.0f} s; 3 replicas of examples/hello")
print(f"node killed (kiln serve, agent and instances, kill -9) to every slot ready on the others, over {KILLS}:")
print(f"  p50 {pct(times, 50):.2f} s, p99 {pct(times, 99):.2f} s, max {times[-1]:.2f} s  [" + ", ".join(f"{t:.2f}" for t in times) + "]")
print(f"  the issue's aim: under 2 x TTL ({2 * TTL:.0f} s) plus the app's start (milliseconds for hello)")
