"""Driver for bench/ab.sh (stdlib only): two builds of kiln, each running
one examples/hello instance behind its own router, measured with the same
wrk alternately (the order turns each round), so that a noisy stretch of
the machine hits both alike."""
import json, os, shutil, statistics, subprocess, sys, tempfile, time

from benchlib import free_port, wait_port, wrk

KILN_A, KILN_B, HELLO = sys.argv[1:4]
RUNS = int(os.environ.get("RUNS", "11"))
DURATION = int(os.environ.get("DURATION", "5"))
CONNS = int(os.environ.get("CONNS", "50"))

work = tempfile.mkdtemp(prefix="kiln-bench-ab-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
agents = []
TICK = os.sysconf("SC_CLK_TCK")


def cpu_secs(pid):
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def deploy(name, kiln):
    """Start an agent of `kiln` and deploy one hello instance; its router port."""
    home, app = f"{work}/{name}/home", f"{work}/{name}/app"
    os.makedirs(f"{app}/bin")
    shutil.copy(HELLO, f"{app}/bin/hello")
    port = free_port()
    with open(f"{app}/kiln.toml", "w") as f:
        f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
listen = "127.0.0.1:{port}"
[services.web.health.readiness]
http = "/healthz"
interval = "250ms"
""")
    agents.append(subprocess.Popen([kiln, "--home", home, "serve"], stderr=subprocess.DEVNULL))
    while not os.path.exists(f"{home}/kiln.sock"):
        time.sleep(0.01)
    subprocess.run([kiln, "--home", home, "apply"], cwd=app, check=True, capture_output=True)
    wait_port(port)
    return port


try:
    ports = {"A": deploy("a", KILN_A), "B": deploy("b", KILN_B)}
    # The agent process (where the router runs) is the supervisor's child:
    # its pid is in the home's agent.lock, not the `kiln serve` started here.
    def agent_pid(name):
        return int(open(f"{work}/{name}/home/agent.lock").read().strip())
    pids = {"A": agent_pid("a"), "B": agent_pid("b")}
    runs = {"A": [], "B": []}
    # The router's CPU per request (the agent process, router threads and
    # all): steadier than the p99 when wrk, router and app share two cores.
    cpu = {"A": [], "B": []}
    for k in range(RUNS):
        for name in (["A", "B"] if k % 2 == 0 else ["B", "A"]):
            before = cpu_secs(pids[name])
            r = wrk(ports[name], CONNS, DURATION)
            cpu[name].append((cpu_secs(pids[name]) - before) / r[3] * 1e6)
            runs[name].append(r)
    print(f"\nmachine: {os.cpu_count()} cores; wrk -t2 -c{CONNS} -d{DURATION}s; medians of {RUNS} alternated runs\n")
    print(f"{'build':<6}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}  binary")
    for name, kiln in (("A", KILN_A), ("B", KILN_B)):
        r = runs[name]
        print(f"{name:<6}{statistics.median(x[0] for x in r):>12.0f}{statistics.median(x[1] for x in r):>9.2f}"
              f"{statistics.median(x[2] for x in r):>9.2f}{statistics.median(cpu[name]):>12.2f}  {kiln}")
    rps = [b[0] / a[0] for a, b in zip(runs["A"], runs["B"])]
    p99 = [b[2] / a[2] for a, b in zip(runs["A"], runs["B"])]
    print(f"B vs A, run by run: requests/s x{statistics.median(rps):.3f} (B ahead in {sum(x > 1 for x in rps)}/{RUNS}), "
          f"p99 x{statistics.median(p99):.2f} (B lower in {sum(x < 1 for x in p99)}/{RUNS})")
    print("p99 ms, run by run (A / B): " + ", ".join(f"{a[2]:.2f}/{b[2]:.2f}" for a, b in zip(runs["A"], runs["B"])))
    failed = sum(x[4] + x[5] for r in runs.values() for x in r)
    print(f"non-2xx and socket errors over all runs: {failed}")
finally:
    for a in agents:
        a.terminate()
    for a in agents:
        try:
            a.wait(timeout=30)
        except subprocess.TimeoutExpired:
            a.kill()
    shutil.rmtree(work, ignore_errors=True)
