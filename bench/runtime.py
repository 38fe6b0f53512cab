"""Driver for bench/runtime.sh (stdlib only; run as root: the oci runtime needs it).

Per runtime (process, sandbox = bubblewrap, oci = kiln's embedded runtime):

(1) the runtime by itself, as a supervisor with nothing of its own to do
    would use it: the exact launcher kiln runs for an instance, replayed by
    hand (its command line and environment read from /proc of a running
    instance; for oci a copy of its bundle, with its own port); `kill -9`
    of its app, its launcher's end awaited, the next start spawned at once,
    until the app accepts on its port;
(2) kiln: `kill -9` of one instance's app until a replacement in its slot
    is ready (kiln notices the death, cleans up, decides, prepares, spawns,
    probes, routes);
(3) kiln's overhead = (2) - (1), p50, against the issue's bound of
    max(5 ms, 10 % of the runtime's own).

(1) and (2) alternate kill by kill, so both see the same machine.

Medians and percentiles over KILLS kills each way, all in one run on
one machine (these machines are noisy: compare within a run).
"""
import json, os, shutil, signal, subprocess, sys, tempfile, time

from benchlib import Agent, answers, api, free_port, kiln_quiet, make_hello_app, pct

KILN, HELLO = sys.argv[1], sys.argv[2]
KILLS = int(os.environ.get("KILLS", "30"))
# RUNTIMES="oci" measures one only.
REPLICAS = 3


def until_accepting(port, limit=10.0):
    # Polled as kiln's self-heals are watched (every 0.5 ms): the same
    # observer on both sides, and no core kept busy by it.
    t0 = time.perf_counter()
    while not answers(port):
        if time.perf_counter() - t0 > limit:
            raise SystemExit(f"nothing listens on {port}")
        time.sleep(0.0005)
    return time.perf_counter() - t0


def children(pid):
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass  # gone meanwhile
    return sorted(out)


def app_of(runtime, pid):
    """The app below an instance's launcher (sandbox and oci: launcher ->
    pid 1 -> app)."""
    if runtime == "process":
        return pid
    return children(children(pid)[0])[0]


def proc_launch(pid):
    """The command line and environment of process `pid`."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    with open(f"/proc/{pid}/status") as f:
        ids = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("Uid:", "Gid:"))}
    return argv, env, ids


class Raw:
    """The runtime by itself: the launcher kiln runs for an instance (read
    from /proc of a running one), replayed by hand — for oci with a copy of
    its bundle (the shim removes its bundle when the container ends) — each
    start on a port of its own."""

    def __init__(self, runtime, launcher_pid, work):
        self.runtime, self.work, self.n = runtime, work, 0
        self.argv, self.env, self.ids = proc_launch(launcher_pid)
        if runtime == "oci":
            # argv: kiln __oci-shim BUNDLE STATE ID
            self.template = os.path.join(work, "bundle-template")
            shutil.copytree(self.argv[2], self.template, symlinks=True)
            with open(os.path.join(self.template, "config.json")) as f:
                self.config = json.load(f)
        if runtime == "sandbox" and "--seccomp" in self.argv:
            # bubblewrap reads its seccomp program from fd 3: replayed
            # without it (the runtime's start measured a hair faster than
            # kiln's own use of it).
            k = self.argv.index("--seccomp")
            del self.argv[k:k + 2]
        self.proc = None

    def prepare(self):
        """What the next start needs, made before it is timed."""
        self.n += 1
        self.port = free_port()
        if self.runtime == "oci":
            copy = os.path.join(self.work, f"bundle-{self.n}")
            shutil.copytree(self.template, copy, symlinks=True)
            c = self.config
            c["process"]["env"] = [e for e in c["process"]["env"] if not e.startswith("PORT=")] + [f"PORT={self.port}"]
            c["linux"]["cgroupsPath"] = f"/kiln-bench/raw-{self.n}"
            with open(os.path.join(copy, "config.json"), "w") as f:
                json.dump(c, f)
            self.next = ([KILN, "__oci-shim", copy, self.argv[3], f"bench-raw-{self.n}"], {})
        else:
            self.next = (self.argv, dict(self.env, PORT=str(self.port)))

    def spawn(self):
        argv, env = self.next
        ids = self.ids

        def drop():
            if ids["Gid"] != os.getgid():
                os.setgid(ids["Gid"])
            if ids["Uid"] != os.getuid():
                os.setuid(ids["Uid"])
        self.proc = subprocess.Popen(argv, env=env, preexec_fn=None if self.runtime == "oci" else drop,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        until_accepting(self.port)

    def heal(self):
        """kill -9 of the app, the launcher's end awaited, a new start
        until it accepts: a supervisor with nothing of its own to do."""
        self.prepare()
        victim = app_of(self.runtime, self.proc.pid)
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        self.proc.wait()
        self.spawn()
        return time.perf_counter() - t0

    def start(self):
        self.prepare()
        t0 = time.perf_counter()
        self.spawn()
        return time.perf_counter() - t0

    def stop(self):
        if self.proc:
            for c in children(self.proc.pid):
                try:
                    os.kill(c, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def kiln_heal(runtime, home, slot):
    st = api(home, "/v1/status")["services"][0]
    victim = next(i for i in st["instances"] if i["slot"] == slot and i["ready"])
    t0 = time.perf_counter()
    os.kill(app_of(runtime, victim["pid"]), signal.SIGKILL)
    while True:
        st = api(home, "/v1/status")["services"][0]
        new = [i for i in st["instances"] if i["slot"] == slot and i["id"] != victim["id"] and i["ready"]]
        if new:
            return time.perf_counter() - t0
        time.sleep(0.0005)


if os.geteuid() != 0:
    raise SystemExit("run as root: the oci runtime needs it")
work = tempfile.mkdtemp(prefix="kiln-bench-runtime-")
os.chmod(work, 0o711)
rows = []
try:
    for runtime in os.environ.get("RUNTIMES", "process sandbox oci").split():
        if runtime == "sandbox" and not shutil.which("bwrap"):
            print("bubblewrap is not installed: sandbox skipped", file=sys.stderr)
            continue
        home, app = f"{work}/{runtime}/home", f"{work}/{runtime}/app"
        make_hello_app(app, HELLO, runtime, REPLICAS)
        kiln_quiet(KILN, home, "bake", cwd=app)
        agent = Agent(KILN, home)
        raw = None
        try:
            kiln_quiet(KILN, home, "apply", cwd=app)
            st = api(home, "/v1/status")["services"][0]
            raw = Raw(runtime, st["instances"][0]["pid"], f"{work}/{runtime}")
            raw.start()
            raw_heals, kiln_heals = [], []
            # Interleaved, so that both see the same machine: one kill under
            # kiln, one by hand. Each kiln slot is killed again only once it
            # has been stable (10 s), so every kill is a first failure,
            # replaced without back-off.
            for k in range(KILLS):
                t_round = time.perf_counter()
                kiln_heals.append(kiln_heal(runtime, home, k % REPLICAS))
                raw_heals.append(raw.heal())
                time.sleep(max(0.0, 10.5 / REPLICAS - (time.perf_counter() - t_round)))
        finally:
            if raw:
                raw.stop()
            agent.stop()
        r50, h50 = pct(raw_heals, 50) * 1000, pct(kiln_heals, 50) * 1000
        rows.append((f"{runtime}: by hand (kill -9, launcher gone, start again, accepting), p50", r50, None))
        rows.append((f"{runtime}: by hand, p99", pct(raw_heals, 99) * 1000, None))
        rows.append((f"{runtime}: kiln self-heal (kill -9 to replacement ready), p50", h50, None))
        rows.append((f"{runtime}: kiln self-heal, p99", pct(kiln_heals, 99) * 1000, None))
        bound = max(5.0, 0.1 * r50)
        rows.append((f"{runtime}: kiln's overhead over the runtime (p50 - p50)", h50 - r50,
                     f"bound max(5 ms, 10%) = {bound:.1f} ms"))
finally:
    shutil.rmtree(work, ignore_errors=True)
    for d in os.listdir("/sys/fs/cgroup") if os.path.isdir("/sys/fs/cgroup") else []:
        base = os.path.join("/sys/fs/cgroup", d, "kiln-bench")
        if os.path.isdir(base):
            for sub in os.listdir(base):
                if os.path.isdir(os.path.join(base, sub)):
                    try:
                        os.rmdir(os.path.join(base, sub))
                    except OSError:
                        pass
            try:
                os.rmdir(base)
            except OSError:
                pass

print(f"\nmachine: {os.cpu_count()} cores; {KILLS} kills per runtime, each way\n")
print(f"{'case':<72} {'ms':>9}")
for name, ms, note in rows:
    print(f"{name:<72} {ms:>9.2f}" + (f"   ({note})" if note else ""))
