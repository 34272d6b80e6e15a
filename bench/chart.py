#!/usr/bin/env python3
"""Draws the time tables of a bench/compare.sh report as one SVG of horizontal bars (seconds, shorter is better).

Usage: bench/chart.py REPORT.md OUT.svg. Reads every `## section` table whose second column is a time in seconds
(for tables with several time columns, e.g. the tree's fresh and no-op, each becomes its own group). Standard
library only."""
import re
import sys
from xml.sax.saxutils import escape


def tables(markdown):
    """[(section title, header, rows)] for every markdown table."""
    found, title = [], None
    for line in markdown.splitlines():
        if line.startswith("<!-- Below: notes kept"):
            break  # hand-written notes after compare.sh's own tables (see compare.sh): not part of the chart
        if line.startswith("|---"):
            continue
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if found and found[-1][0] == title and found[-1][3]:
                found[-1][2].append(cells)
            else:
                found.append((title, cells, [], True))
        elif found:
            found[-1] = found[-1][:3] + (False,)
    return [(t, h, rows) for t, h, rows, _ in found]


def seconds(cell):
    try:
        return float(cell)
    except ValueError:
        return None


def groups(markdown):
    """[(title, [(label, seconds)])]: tables whose rows are tools give one group per time column; tables whose rows
    are cases (the delta's edits) give one group per row, a bar per tool column."""
    found = []
    for title, header, rows in tables(markdown):
        timed = [i for i, name in enumerate(header) if i > 0 and "(s)" in name]
        if not timed:
            continue
        if header[0] == "tool":
            for i in timed:
                name = header[i].replace(" (s)", "")
                bars = [(r[0], seconds(r[i])) for r in rows if i < len(r) and seconds(r[i]) is not None]
                suffix = "" if name == "time" else f": {name}"
                found.append((f"{title}{suffix}", bars))
        else:
            for r in rows:
                bars = [(header[i].replace(" time (s)", "").replace(" (s)", ""), seconds(r[i]))
                        for i in timed if i < len(r) and seconds(r[i]) is not None]
                found.append((f"{title}: {r[0]}", bars))
    return [g for g in found if g[1]]


def svg(all_groups, source):
    width, label_w, bar_w, row_h, gap = 980, 420, 440, 18, 30
    rows = sum(len(g[1]) for g in all_groups)
    height = 60 + rows * row_h + len(all_groups) * gap
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">ferry beside rsync and socat (seconds, shorter is better)</text>',
           f'<text x="10" y="38" fill="#555">{escape(source)}</text>']
    y = 50
    for title, bars in all_groups:
        y += gap - 8
        out.append(f'<text x="10" y="{y}" font-weight="bold">{escape(title)}</text>')
        y += 6
        top = max(s for _, s in bars) or 1
        for label, seconds in bars:
            w = max(1, int(bar_w * seconds / top))
            colour = "#d9822b" if label.lower().startswith("ferry") else "#5b7fa6"
            out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(label[:64])}</text>')
            out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w}" height="{row_h - 4}" fill="{colour}"/>')
            out.append(f'<text x="{label_w + w + 4}" y="{y + 13}">{seconds:.3f}</text>')
            y += row_h
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    report, target = sys.argv[1], sys.argv[2]
    text = open(report, encoding="utf-8").read()
    first = re.search(r"Produced by .*?on (\S+),", text)
    source = f"{report}" + (f", run of {first.group(1)}" if first else "")
    open(target, "w", encoding="utf-8").write(svg(groups(text), source))


if __name__ == "__main__":
    main()
