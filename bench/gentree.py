"""The bench tree: ~1 GiB in ~20,000 files (dependencies, assets, an app),
generated from a fixed seed so every run and every benchmark sees the same
bytes. Used by bench/bake.sh and bench/registry.sh:

    python3 bench/gentree.py DIR
"""
import os, random, sys
root = sys.argv[1]
rng = random.Random(42)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
def compressible(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])
def write(rel, data, exe=False):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, 0o755 if exe else 0o644)
total = 0
# dependencies: many small and medium files, mostly compressible
for i in range(14000):
    n = rng.randint(512, 16 << 10)
    write(f"deps/pkg{i % 400:03d}/mod{i:05d}.py", compressible(n)); total += n
for i in range(3000):
    n = rng.randint(16 << 10, 256 << 10)
    data = compressible(n) if i % 2 else rng.randbytes(n)
    write(f"deps/lib{i % 100:03d}/blob{i:05d}.so", data, exe=True); total += n
# assets: larger, mostly incompressible (images, fonts)
for i in range(120):
    n = rng.randint(2 << 20, 5 << 20)
    write(f"assets/img/{i:04d}.png", rng.randbytes(n)); total += n
# the app itself: small
for i in range(2880):
    n = rng.randint(256, 4 << 10)
    write(f"src/m{i // 100:02d}/f{i:05d}.rs", compressible(n)); total += n
write("src/main.rs", compressible(1024))
print(f"{total / 2**30:.2f} GiB", file=sys.stderr)
