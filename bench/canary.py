"""Driver for bench/canary.sh (stdlib only)."""
import datetime, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

from benchlib import free_port, pct

KILN, HELLO = sys.argv[1:3]
ABORTS = int(os.environ.get("ABORTS", "10"))
CLIENTS = int(os.environ.get("CLIENTS", "4"))


work = tempfile.mkdtemp(prefix="kiln-bench-canary-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
home, app = f"{work}/home", f"{work}/app"
port = free_port()
os.makedirs(f"{app}/bin")
shutil.copy(HELLO, f"{app}/bin/hello")


def write_spec(env):
    with open(f"{app}/kiln.toml", "w") as f:
        f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
replicas = 3
listen = "127.0.0.1:{port}"
env = {{ {env} }}
[services.web.health.readiness]
http = "/healthz"
interval = "250ms"
[services.web.rollout]
strategy = "canary"
steps = [{{ weight = 20, pause = "1m" }}, {{ weight = 100 }}]
[services.web.rollout.analysis]
max_error_rate = "5%"
min_requests = 50
""")


def kiln(*args):
    return subprocess.run([KILN, "--home", home, *args], cwd=app, check=True, capture_output=True, text=True).stdout


# Each client: one keep-alive connection, every answer as
# (sent, received, status, body) with wall-clock times (the agent's log
# uses the same clock).
answers, stop = [], threading.Event()


def client():
    mine = []
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    while not stop.is_set():
        sent = time.time()
        s.sendall(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.partition(b":")
            if k.lower() == b"content-length":
                length = int(v)
        body = f.read(length).decode()
        mine.append((sent, time.time(), status, body))
    answers.extend(mine)


log = open(f"{work}/agent.log", "w")
agent = subprocess.Popen([KILN, "--home", home, "serve"], stderr=log)
try:
    while not os.path.exists(f"{home}/kiln.sock"):
        time.sleep(0.01)
    write_spec('HELLO_VERSION = "v1"')
    kiln("apply")
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for k in range(ABORTS):
        write_spec(f'HELLO_VERSION = "c{k + 2}", HELLO_ERROR_RATE = "0.3"')
        r = subprocess.run([KILN, "--home", home, "apply"], cwd=app, capture_output=True, text=True)
        assert r.returncode != 0 and "canary analysis failed" in r.stderr, r.stderr
        kiln("rollout", "status", "web")  # back on stable, the canary fleet gone
        print(f"abort {k + 1}/{ABORTS}: {r.stderr.strip().splitlines()[-1][:150]}", file=sys.stderr)
    stop.set()
    for t in threads:
        t.join()
finally:
    agent.send_signal(signal.SIGTERM)
    agent.wait()
    log.close()

aborts = {}
for line in open(f"{work}/agent.log"):
    m = re.match(r"(\S+)\s+WARN.*canary release (\d+) aborted: .*routes switched in (\d+)us", line)
    if m:
        logged = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        swap = int(m.group(3)) / 1e6
        aborts[int(m.group(2))] = (logged - swap, swap)
shutil.rmtree(work, ignore_errors=True)
assert len(aborts) == ABORTS, f"{len(aborts)} aborts logged"

def first_answer(revision):
    return min((a[1] for a in answers if a[3].startswith(f"hello from c{revision} ")), default=None)


swaps, drains, detects, late = [], [], [], 0
for revision, (decided, swap) in sorted(aborts.items()):
    tag = f"hello from c{revision} "
    # A 500 is a canary's (stable never fails): this one's if it came
    # before the next canary's first answer.
    first = first_answer(revision)
    until = min(decided + 5, first_answer(revision + 1) or float("inf"))
    canary = [a for a in answers if (a[3].startswith(tag) or a[2] == 500) and first <= a[1] < until]
    late += sum(1 for a in canary if a[0] > decided + swap)
    swaps.append(swap * 1e3)
    drains.append(max(0.0, max(a[1] for a in canary) - decided) * 1e3)
    detects.append((decided - first) * 1e3)


print(f"\ncanary aborts under load: {ABORTS}, {len(answers)} requests from {CLIENTS} keep-alive clients")
print(f"  swap, decision to stable-only routes:  p50 {statistics.median(swaps):.3f} ms  p99 {pct(swaps, 99):.3f} ms  max {max(swaps):.3f} ms")
print(f"  canary answers to requests sent after the swap: {late}")
print(f"  last canary answer after the decision: p50 {statistics.median(drains):.2f} ms  max {max(drains):.2f} ms (requests in flight)")
print(f"  detection, first canary answer to decision: p50 {statistics.median(detects):.0f} ms  max {max(detects):.0f} ms")
