"""Top warp stalls of an Nsight Compute source page: `python scripts/ncu_stalls.py rep.sass.csv [n]`
(from `ncu --import rep --page source --csv --print-source sass`)."""
import csv
import sys


def main(path: str, top: int = 12) -> None:
    rows = list(csv.reader(open(path)))
    hdr, data = rows[1], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    per, total = [], {h: 0 for h in stalls}
    for r in data:
        n = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        d = {h: int(r[col[h]] or 0) for h in stalls}
        for h in stalls:
            total[h] += d[h]
        per.append((n, r[col["Source"]].strip(), max(d, key=d.get)))
    all_n = sum(p[0] for p in per)
    print(f"{path}: {all_n} samples; " + ", ".join(
        f"{h[6:]} {100 * v / all_n:.1f}%" for h, v in sorted(total.items(), key=lambda x: -x[1])[:6]))
    for n, src, why in sorted(per, key=lambda p: -p[0])[:top]:
        print(f"  {100 * n / all_n:5.1f}% {why[6:]:12s} {src[:70]}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
