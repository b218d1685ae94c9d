"""The hottest straight-line SASS segments of one kernel, from an Nsight Compute source export.

    python3 tools/ncu_hot_loops.py ncu_source.log --top=6 --listing=1

Reads the CSV that `ncu --page source --print-source sass --csv` writes (the `ncu_source` step
of tools/device_run.sh) and groups consecutive instructions with the same execution count
(a loop body or a straight-line block). Prints per segment: its instructions, how often it ran,
its share of all executed warp instructions and of the warp-stall samples; `--listing=N`
prints the SASS of the N hottest segments.
"""
import argparse
import csv
import io


def read_rows(path):
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    end = next((j for j in range(start + 1, len(lines)) if not lines[j].startswith('"0x')), len(lines))
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:end]))))
    return rows[0], rows[1:]


def segments(header, rows):
    count = header.index("Instructions Executed")
    stall = header.index("Warp Stall Sampling (All Samples)")
    segs = []
    for k, row in enumerate(rows):
        c, s = int(row[count]), int(row[stall])
        if segs and segs[-1]["count"] == c and segs[-1]["last"] == k - 1:
            segs[-1]["last"] = k
            segs[-1]["stalls"] += s
        else:
            segs.append(dict(first=k, last=k, count=c, stalls=s))
    return segs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--listing", type=int, default=1)
    args = parser.parse_args()
    header, rows = read_rows(args.path)
    source = header.index("Source")
    segs = segments(header, rows)
    total = sum(s["count"] * (s["last"] - s["first"] + 1) for s in segs)
    samples = max(sum(s["stalls"] for s in segs), 1)
    segs.sort(key=lambda s: -s["count"] * (s["last"] - s["first"] + 1))
    print(f"executed warp instructions: {total}, stall samples: {samples}")
    for s in segs[:args.top]:
        n = s["last"] - s["first"] + 1
        print(f"SASS {s['first']:5d}-{s['last']:5d}: {n:3d} instructions x {s['count']:9d} = "
              f"{100 * n * s['count'] / total:5.1f} % of instructions, {100 * s['stalls'] / samples:5.1f} % of "
              f"stall samples; first: {rows[s['first']][source].strip()[:48]}")
    for s in segs[:args.listing]:
        print(f"\nSASS {s['first']}-{s['last']}:")
        for row in rows[s["first"]:s["last"] + 1]:
            print("   ", row[source].strip())


if __name__ == "__main__":
    main()
