"""Summarizes bench/reconcile.sh's runs (JSON objects on stdin): for each
path (`direct`, as the controller was before the leader/node split;
`split`, through the state store and the assignments, as it is now), the
pass times and the rolling update's rate, with the split's ratio to the
direct path measured in the same run, and the README's figures beside."""
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

# The README's figures (reference machine), printed beside today's so that
# a regression shows.
README = {
    "pass_us_per_instance": {"direct": 0.025, "split": 0.035},
    "rolling": {1: {"direct": 78_000, "split": 14_400}, 25: {"direct": 151_000, "split": 86_000}},
}

print("one reconcile pass over a steady fleet (median of 21):")
print("  %10s %12s %12s %12s %12s" % ("instances", "direct ms", "split ms", "split us/i", "split/direct"))
paths = runs[0]["paths"]
for d, s in zip(paths["direct"]["pass"], paths["split"]["pass"]):
    print(
        "  %10d %12.3f %12.3f %12.4f %11.2fx"
        % (d["instances"], d["pass_ms"], s["pass_ms"], s["us_per_instance"], s["pass_ms"] / d["pass_ms"])
    )
print("  README: %.3f us/instance direct, %.2f split" % (README["pass_us_per_instance"]["direct"], README["pass_us_per_instance"]["split"]))
print("rolling update of 10,000 instances to a new release:")
for r in runs:
    ref = README["rolling"].get(r["max_surge"])
    rates = {}
    for path in ("direct", "split"):
        u = r["paths"][path]["rolling_update"]
        rates[path] = u["replacements_per_second"]
        readme = ref.get(path) if ref else None
        print(
            "  max_surge %3d, %-6s: %d replacements in %.3f s (%d passes): %s/s%s"
            % (
                r["max_surge"],
                path,
                u["replacements"],
                u["seconds"],
                u["passes"],
                format(int(rates[path]), ","),
                "  (README: %s/s, now %.2fx)" % (format(readme, ","), rates[path] / readme) if readme else "",
            )
        )
    print("  max_surge %3d: split/direct %.2fx" % (r["max_surge"], rates["split"] / rates["direct"]))
