"""Summarizes bench/reconcile.sh's runs (JSON objects on stdin)."""
import json
import sys

text = sys.stdin.read()
runs, depth, start = [], 0, 0
for i, c in enumerate(text):
    if c == "{":
        depth += 1
        if depth == 1:
            start = i
    elif c == "}":
        depth -= 1
        if depth == 0:
            runs.append(json.loads(text[start : i + 1]))

print("one reconcile pass over a steady fleet (median of 21):")
print("  %10s %10s %12s" % ("instances", "pass ms", "us/instance"))
for p in runs[0]["pass"]:
    print("  %10d %10.3f %12.4f" % (p["instances"], p["pass_ms"], p["us_per_instance"]))
# The README's figures (reference machine), printed beside today's so that
# a regression shows.
README = {"pass_us_per_instance": 0.026, "rolling": {1: 74_000, 25: 121_000}}
print("  README: %.3f us/instance" % README["pass_us_per_instance"])
print("rolling update of 10,000 instances to a new release:")
for r in runs:
    u = r["rolling_update"]
    rate = u["replacements_per_second"]
    ref = README["rolling"].get(r["max_surge"])
    print(
        "  max_surge %3d: %d replacements in %.3f s (%d passes): %s/s%s"
        % (
            r["max_surge"],
            u["replacements"],
            u["seconds"],
            u["passes"],
            format(int(rate), ","),
            "  (README: %s/s, now %.2fx)" % (format(ref, ","), rate / ref) if ref else "",
        )
    )
