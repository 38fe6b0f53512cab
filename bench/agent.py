"""Driver for bench/agent.sh (stdlib only, so it runs anywhere python3 does).

(1) `kiln apply` of 10 replicas until all are ready, minus the app's own
    start-up (10 bare `hello` processes started at once, until all answer);
    per runtime (sandbox, process, and oci as root); medians over RUNS.
(2) self-healing: `kill -9` one instance, time until a new instance in its
    slot is ready, p50/p99 over KILLS kills (round-robin over the 10 slots, so
    each kill is a slot's first failure and is replaced without back-off),
    against the bare app's own start-up p50/p99.
"""
import os, shutil, signal, statistics, subprocess, sys, tempfile, time

from benchlib import Agent, answers, api, free_port, kiln_quiet, make_hello_app, pct

KILN, HELLO = sys.argv[1], sys.argv[2]
RUNS = int(os.environ.get("RUNS", "5"))
KILLS = int(os.environ.get("KILLS", "50"))
REPLICAS = 10


def bare_start(n):
    """Seconds from spawning n bare apps to all of them accepting."""
    ports = [free_port() for _ in range(n)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([HELLO], env={"PORT": str(p)}, stderr=subprocess.DEVNULL) for p in ports]
    pending = set(ports)
    while pending:
        pending = {p for p in pending if not answers(p)}
    dt = time.perf_counter() - t0
    for p in procs:
        p.kill()
        p.wait()
    return dt


work = tempfile.mkdtemp(prefix="kiln-bench-agent-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
rows = []
try:
    bare = statistics.median(bare_start(REPLICAS) for _ in range(RUNS))
    rows.append(("bare: 10 x hello started at once, all accepting", bare * 1000, None))
    # oci (kiln's embedded runtime) needs root.
    for runtime in ["sandbox", "process"] + (["oci"] if os.geteuid() == 0 else []):
        applies, materialize = [], []
        for i in range(RUNS):
            home, app = f"{work}/{runtime}{i}/home", f"{work}/{runtime}{i}/app"
            make_hello_app(app, HELLO, runtime, REPLICAS)
            kiln_quiet(KILN, home, "bake", cwd=app)
            t0 = time.perf_counter()
            kiln_quiet(KILN, home, "unpack", "hello")
            materialize.append(time.perf_counter() - t0)
            agent = Agent(KILN, home)
            try:
                t0 = time.perf_counter()
                kiln_quiet(KILN, home, "apply", cwd=app)
                applies.append(time.perf_counter() - t0)
            finally:
                agent.stop()
        med = statistics.median(applies)
        rows.append((f"kiln apply, {REPLICAS} replicas, runtime {runtime}: command to all ready", med * 1000, None))
        rows.append((f"  kiln's overhead per instance ({runtime})", (med - bare) * 1000 / REPLICAS, "target < 20 ms"))
        rows.append((f"  (not in the above) first unpack of the image tree", statistics.median(materialize) * 1000, None))

    # Self-healing.
    one = [bare_start(1) for _ in range(KILLS)]
    home, app = f"{work}/heal/home", f"{work}/heal/app"
    make_hello_app(app, HELLO, "sandbox", REPLICAS)
    kiln_quiet(KILN, home, "bake", cwd=app)
    agent = Agent(KILN, home)
    heals = []
    try:
        kiln_quiet(KILN, home, "apply", cwd=app)
        for k in range(KILLS):
            slot = k % REPLICAS
            st = api(home, "/v1/status")["services"][0]
            victim = next(i for i in st["instances"] if i["slot"] == slot and i["ready"])
            t0 = time.perf_counter()
            os.kill(victim["pid"], signal.SIGKILL)
            while True:
                st = api(home, "/v1/status")["services"][0]
                new = [i for i in st["instances"] if i["slot"] == slot and i["id"] != victim["id"] and i["ready"]]
                if new:
                    heals.append(time.perf_counter() - t0)
                    break
                time.sleep(0.0005)
            # Round-robin: each slot is killed again only after it has been
            # stable (10 s), so every kill is a first failure.
            time.sleep(max(0.0, 10.5 / REPLICAS - (time.perf_counter() - t0)))
    finally:
        agent.stop()
    rows.append(("bare hello start-up (spawn to accepting), p50", pct(one, 50) * 1000, None))
    rows.append(("bare hello start-up, p99", pct(one, 99) * 1000, None))
    rows.append((f"self-healing (kill -9 to replacement ready), p50 over {KILLS}", pct(heals, 50) * 1000, None))
    rows.append((f"self-healing, p99 over {KILLS}", pct(heals, 99) * 1000, f"target < 50 ms + app start-up p99 = {50 + pct(one, 99) * 1000:.1f} ms"))
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"\nmachine: {os.cpu_count()} cores; medians of {RUNS} runs; {KILLS} kills\n")
print(f"{'case':<72} {'ms':>9}")
for name, ms, note in rows:
    print(f"{name:<72} {ms:>9.2f}" + (f"   ({note})" if note else ""))
