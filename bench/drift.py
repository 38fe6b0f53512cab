"""Driver for bench/drift.sh (stdlib only)."""
import datetime, json, os, re, shutil, signal, sqlite3, subprocess, sys, tempfile, time

from benchlib import free_port, pct

KILN, HELLO, BENCH = sys.argv[1], sys.argv[2], sys.argv[3]
EDITS = int(os.environ.get("EDITS", "20"))
FILES = int(os.environ.get("FILES", "100000"))
IDLE = int(os.environ.get("IDLE", "30"))

work = tempfile.mkdtemp(prefix="kiln-bench-drift-")
# Searchable by everyone: an agent running as root runs instances as nobody.
os.chmod(work, 0o711)
home, app = f"{work}/home", f"{work}/app"
port = free_port()
os.makedirs(f"{app}/web/bin")
shutil.copy(HELLO, f"{app}/web/bin/hello")
os.makedirs(f"{app}/web/static")
with open(f"{app}/web/static/page.html", "w") as f:
    f.write("original\n")
# The watched image: FILES small files in directories of 100.
for i in range(FILES):
    d = f"{app}/many/data/d{i // 100:04d}"
    if i % 100 == 0:
        os.makedirs(d)
    with open(f"{d}/f{i:06d}", "w") as f:
        f.write(f"file {i}\n")
os.makedirs(f"{app}/many/bin")
shutil.copy(HELLO, f"{app}/many/bin/hello")
with open(f"{app}/kiln.toml", "w") as f:
    f.write(f"""
[images.web]
context = "web"
entrypoint = ["/bin/hello"]
[images.many]
context = "many"
entrypoint = ["/bin/hello"]
[services.web]
image = "web"
replicas = 2
listen = "127.0.0.1:{port}"
[services.web.health.readiness]
http = "/healthz"
interval = "100ms"
[services.many]
image = "many"
replicas = 1
""")


def kiln(*args, at=None):
    return subprocess.run([KILN, "--home", at or home, *args], cwd=app, check=True, capture_output=True,
                          text=True).stdout


def serve(*extra, at=None):
    log = open(f"{work}/agent.log", "a")
    p = subprocess.Popen([KILN, "--home", at or home, "serve", *extra], stdout=subprocess.DEVNULL, stderr=log,
                         start_new_session=True)
    for _ in range(500):
        if os.path.exists(f"{at or home}/kiln.sock"):
            try:
                kiln("status", at=at)
                return p
            except subprocess.CalledProcessError:
                pass
        time.sleep(0.02)
    raise SystemExit("the agent did not start")


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(60)


def agent_pid(supervisor):
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor.pid and b"--run-agent" in cmd:
            return int(d)
    raise SystemExit("no agent process")


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def events(kind, after):
    db = sqlite3.connect(f"file:{home}/state.db?mode=ro", uri=True)
    rows = db.execute("SELECT seq, time, service, instance FROM events WHERE kind = ? AND seq > ? ORDER BY seq",
                      (kind, after)).fetchall()
    db.close()
    return rows


def last_seq():
    db = sqlite3.connect(f"file:{home}/state.db?mode=ro", uri=True)
    (n,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
    db.close()
    return n


def ready(service, n):
    s = json.loads(kiln("status", "--json"))
    svc = next(x for x in s["services"] if x["name"] == service)
    return sum(1 for i in svc["instances"] if i["ready"]) == n and len(svc["instances"]) == n


def ids(service):
    s = json.loads(kiln("status", "--json"))
    return {i["id"] for x in s["services"] if x["name"] == service for i in x["instances"]}


def wait(cond, what, limit=120):
    end = time.time() + limit
    while not cond():
        if time.time() > end:
            raise SystemExit(f"timed out: {what}")
        time.sleep(0.05)


print(f"work dir {work}", file=sys.stderr)
sup = serve("--verify-every", "1h")
try:
    t = time.time()
    kiln("apply")
    print(f"applied ({FILES} files baked and unpacked) in {time.time() - t:.1f}s", file=sys.stderr)
    wait(lambda: ready("web", 2) and ready("many", 1), "services ready")
    trees = f"{home}/trees"
    web_image = json.loads(kiln("history", "web", "--json"))["releases"][0]["config"]["image"].split(":")[1]
    page = f"{trees}/{web_image}/rootfs/static/page.html"

    # (1) latency over EDITS edits.
    detect, recorded, started = [], [], []
    log_re = re.compile(r"^(\S+Z)\s+WARN .*drift: tree of sha256:" + web_image + r": static/page.html")
    for i in range(EDITS):
        before = ids("web")
        seq = last_seq()
        loglen = os.path.getsize(f"{work}/agent.log")
        os.chmod(page, 0o644)
        t_write = time.time()
        with open(page, "w") as f:
            f.write(f"edit {i}\n")
        wait(lambda: events("tree-drift", seq), "the finding")
        (dseq, dtime, _, _), = events("tree-drift", seq)[:1]
        wait(lambda: events("instance-started", dseq), "the replacement")
        stime = events("instance-started", dseq)[0][1]
        with open(f"{work}/agent.log") as f:
            f.seek(loglen)
            seen = [ts(m.group(1)) for line in f if (m := log_re.match(line))]
        detect.append((seen[0] - t_write) * 1000 if seen else float("nan"))
        recorded.append((ts(dtime) - t_write) * 1000)
        started.append((ts(stime) - t_write) * 1000)
        wait(lambda: ready("web", 2) and not (ids("web") & before), "both instances replaced")
        page = f"{trees}/{web_image}/rootfs/static/page.html"
        # A tree that drifts again within twice its last repair's wait (2 s
        # at first) waits longer for its next repair (the detector's
        # back-off): each edit here is a first drift.
        time.sleep(4.5)
finally:
    stop(sup)

# (2) the full verification of the ~1 GiB bench tree against sha256sum.
tree_src = f"{work}/bigtree"
subprocess.run([sys.executable, f"{BENCH}/gentree.py", tree_src], check=True)
with open(f"{work}/big.toml", "w") as f:
    f.write('[images.big]\ncontext = "bigtree"\n')
subprocess.run([KILN, "--home", home, "bake", "-f", f"{work}/big.toml"], cwd=work, check=True, capture_output=True)
rootfs = kiln("unpack", "big").strip()
files = subprocess.run(["find", rootfs, "-type", "f"], capture_output=True, text=True, check=True).stdout.split()
with open(f"{work}/files.txt", "w") as f:
    f.write("\n".join(files))


def sha256sum(procs):
    t = time.time()
    subprocess.run(f"xargs -a {work}/files.txt -d '\\n' -P{procs} -n 500 sha256sum > /dev/null", shell=True, check=True)
    return time.time() - t


sha256sum(2)  # warm the page cache
size = sum(os.path.getsize(p) for p in files)
sup = serve("--verify-every", "1h", "--verify-rate", "0")
try:
    wait(lambda: json.loads(kiln("drift", "--json"))["verification"] is not None, "the verification", 600)
    v = json.loads(kiln("drift", "--json"))["verification"]
finally:
    stop(sup)
one, two = sha256sum(1), sha256sum(2)


def idle_cpu(at, watch):
    """The agent's CPU (percent of one core) over IDLE seconds on a home
    with nothing running: with the `many` tree materialized (watched), or
    with no tree at all."""
    if watch:
        kiln("bake", "many", at=at)
        kiln("unpack", "many", at=at)
    p = serve("--verify-every", "1h", at=at)
    try:
        wait(lambda: json.loads(kiln("drift", "--json", at=at))["verification"] is not None, "the verification", 600)
        time.sleep(2)
        w = json.loads(kiln("drift", "--json", at=at))["watching"]
        apid, hz = agent_pid(p), os.sysconf("SC_CLK_TCK")
        c0, t0 = cpu_ticks(apid), time.time()
        time.sleep(IDLE)
        c1, t1 = cpu_ticks(apid), time.time()
        return (c1 - c0) / hz / (t1 - t0) * 100, (c1 - c0), w
    finally:
        stop(p)


watching_cpu, watching_ticks, w = idle_cpu(f"{work}/idle-watch", True)
empty_cpu, empty_ticks, _ = idle_cpu(f"{work}/idle-empty", False)

print(f"\n(1) drift latency over {EDITS} edits of a running service's tree (2 instances, sandbox):")
for name, xs in [("write -> found (detector's log)", detect), ("write -> ledger entry (fresh tree made)", recorded),
                 ("write -> replacement instance started", started)]:
    print(f"    {name:42} p50 {pct(xs, 50):7.1f} ms   p99 {pct(xs, 99):7.1f} ms")
print("    anchors: Argo CD notices drift every 180,000 ms by default; ostree fsck / nix store --verify: by hand")
print(f"\n(2) full verification of {len(files):,} files, {size / 2**30:.2f} GiB (every tree in the store; warm cache):")
mib = lambda b, s: b / 2**20 / s
print(f"    kiln (one thread, unpaced)   {v['seconds']:6.2f} s  {mib(v['bytes'], v['seconds']):7.0f} MiB/s  ({v['files']:,} files, {v['bytes'] / 2**30:.2f} GiB: all trees)")
print(f"    sha256sum, 1 process         {one:6.2f} s  {mib(size, one):7.0f} MiB/s")
print(f"    sha256sum, 2 processes       {two:6.2f} s  {mib(size, two):7.0f} MiB/s")
print(f"    kiln / sha256sum (1 process): {mib(v['bytes'], v['seconds']) / mib(size, one):.2f}x throughput; "
      f"by default the agent paces it to 64 MiB/s")
print(f"\n(3) idle agent, no instance, nothing changing, {IDLE} s (CPU time of the agent process):")
print(f"    watching {w['trees']} tree, {w['files']:,} files in {w['directories']:,} directories: "
      f"{watching_cpu:.2f}% of one core ({watching_ticks} ticks)")
print(f"    with no tree to watch:                        {empty_cpu:.2f}% of one core ({empty_ticks} ticks)")
shutil.rmtree(work, ignore_errors=True)
