#!/usr/bin/env python3
"""flamegraph.py - a flame graph (SVG) from `perf script` output, with no other tool.

usage: perf script -i perf.data | scripts/flamegraph.py "title" > out.svg

Stacks are folded by thread name (the root frames), then function; inlined frames keep
their names. Width is the share of samples; hover a box for its name and share.
"""
import html
import zlib
import re
import sys
from collections import defaultdict

title = sys.argv[1] if len(sys.argv) > 1 else "flame graph"
folded = defaultdict(int)
for block in sys.stdin.read().split("\n\n"):
    lines = [l for l in block.split("\n") if l.strip()]
    if not lines:
        continue
    comm = lines[0].split()[0]
    frames = []
    for l in lines[1:]:
        parts = l.strip().split(None, 1)
        if len(parts) < 2:
            continue
        sym = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].rsplit(" (", 1)[0])
        sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
        frames.append(sym)
    frames.reverse()
    folded[tuple([comm] + frames)] += 1

total = sum(folded.values()) or 1
tree = {}
for stack, n in folded.items():
    node = tree
    for f in stack:
        node = node.setdefault(f, [0, {}])
        node[0] += n
        node = node[1]

W, H = 1800, 16
out = []
depth_max = [0]


def walk(children, x, depth):
    for name, (n, kids) in sorted(children.items()):
        w = n / total * W
        if w >= 0.3:
            depth_max[0] = max(depth_max[0], depth)
            hue = 10 + (zlib.crc32(name.encode()) % 40)
            label = html.escape(name)
            short = label if w > 7 * len(name) else label[: max(0, int(w / 7) - 2)] + ".." if w > 21 else ""
            out.append(
                f'<g><title>{label} ({n} samples, {100 * n / total:.1f}%)</title>'
                f'<rect x="{x:.1f}" y="{{Y{depth}}}" width="{w:.1f}" height="{H - 1}" '
                f'fill="hsl({hue},80%,60%)"/>'
                f'<text x="{x + 2:.1f}" y="{{T{depth}}}" font-size="11">{short}</text></g>'
            )
            walk(kids, x, depth + 1)
        x += w


walk(tree, 0.0, 0)
rows = depth_max[0] + 1
height = rows * H + 40
svg = "\n".join(out)
for d in range(rows):
    y = height - 10 - (d + 1) * H
    svg = svg.replace("{Y%d}" % d, str(y)).replace("{T%d}" % d, str(y + 12))
print(
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="monospace">'
    f'<text x="4" y="16" font-size="14">{html.escape(title)} ({total} samples)</text>\n{svg}\n</svg>'
)
