"""Helpers the bench drivers share (stdlib only)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(xs, q):
    """The q-th percentile (0 to 100) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wait_port(port):
    """Wait (up to 5 s) until something listens on 127.0.0.1:port."""
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"nothing listens on {port}")


def to_ms(v):
    """wrk's `123.45us` / `1.2ms` / `2s` in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n if u == "ms" else n * 1000


def wrk(port, conns, duration, path="/", host=None, scheme="http", close=False):
    """One wrk run on 127.0.0.1:port (with `host` as its Host; a new
    connection per request when `close`): (requests/s, p50 ms, p99 ms,
    requests, non-2xx, socket errors)."""
    extra = ["-H", f"Host: {host}"] if host else []
    extra += ["-H", "Connection: close"] if close else []
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{duration}s", "--latency", *extra,
                          f"{scheme}://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = sum(map(int, m.groups())) if (m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0
    return rps, p50, p99, total, non2xx, sock


def api(home, path):
    """GET `path` from the agent of `home` on its Unix socket: the JSON body."""
    import json
    import os
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(home, "kiln.sock"))
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: kiln\r\nconnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return json.loads(body)


def answers(port):
    """Whether something accepts on 127.0.0.1:port now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def make_hello_app(root, hello, runtime, replicas):
    """A context with `hello` at /bin/hello and a spec of `replicas`
    instances under `runtime`. With a `listen`, an instance is ready once its
    port accepts (as bare apps are timed): without one it would count as
    ready as soon as it runs."""
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(hello, os.path.join(root, "bin", "hello"))
    with open(os.path.join(root, "kiln.toml"), "w") as f:
        f.write(f"""
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
replicas = {replicas}
runtime = "{runtime}"
listen = "127.0.0.1:{free_port()}"
""")


class Agent:
    """`kiln serve` of `home` (with `process` allowed: it is off by default,
    as it runs the app unconfined), until its socket exists."""

    def __init__(self, kiln, home):
        self.home = home
        self.proc = subprocess.Popen([kiln, "--home", home, "serve", "--allow-runtime", "process"],
                                     stderr=subprocess.DEVNULL)
        while not os.path.exists(os.path.join(home, "kiln.sock")):
            time.sleep(0.01)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def kiln_quiet(kiln, home, *args, cwd=None):
    """A kiln command on `home`, its output dropped; fails the bench if it fails."""
    subprocess.run([kiln, "--home", home, *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
