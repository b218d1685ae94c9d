"""Markdown table of the ResNet-50 1x1 peer comparison (issue 13) from `peer_bench.py` rows.

    python3 tools/peer_table.py experiments/results/h200/peers_r50_1x1_cluster_2026-12-03.jsonl

Machines drift between runs, so every time is compared through its ratio to XLA's HIGHEST
dense kernel time of the same run. The peers' ratios come from the external measurement
quoted in issue 13 (H200, 2026-12-02, same DLMC 0.9 patterns; Sputnik and cuSPARSE on
channel-major activations, CUDA-graph timed); jaxsparse's from the rows given.
"""
import argparse
import json
import math

# Issue 13's table (µs): XLA HIGHEST dense, best fp32 peer, Sputnik fp16; (batch 1, batch 32).
REFERENCE_2026_12_02 = {
    "bottleneck_1_block_group1_1_1": ((15.0, 5.6, 5.0), (187.4, 89.7, 35.3)),
    "bottleneck_3_block_group1_1_1": ((15.5, 6.2, 4.0), (198.2, 108.0, 62.7)),
    "bottleneck_1_block_group2_1_1": ((19.6, 6.4, 5.8), (145.0, 61.8, 38.1)),
    "bottleneck_3_block_group2_1_1": ((14.2, 6.3, 6.3), (142.2, 91.8, 43.4)),
    "bottleneck_1_block_group3_1_1": ((31.5, 8.4, 10.2), (137.3, 55.0, 36.7)),
    "bottleneck_3_block_group3_1_1": ((14.4, 5.7, 5.4), (139.3, 72.0, 32.6)),
    "bottleneck_1_block_group4_1_1": ((56.4, 8.2, 12.4), (163.5, 53.3, 49.2)),
    "bottleneck_3_block_group4_1_1": ((20.6, 8.4, 13.4), (122.6, 57.2, 59.5)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", help="peer_bench.py --out JSON lines")
    parser.add_argument("--family", default="auto")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.rows)]
    mine = {(r["layer"], r["batch"], r["dtype"]): r for r in rows if r["family"] == args.family}
    print("| layer (M x K) | batch | jaxsparse f32 / XLA | best peer fp32 / XLA | x behind | "
          "jaxsparse bf16 / XLA | Sputnik fp16 / XLA | x behind | cuSPARSE (BCSR, NHWC) / XLA |")
    print("|---|---|---|---|---|---|---|---|---|")
    behind = {"float32": [], "bfloat16": []}
    for layer, refs in REFERENCE_2026_12_02.items():
        for batch, (xla, peer32, sputnik16) in zip((1, 32), refs):
            f32, bf16 = mine.get((layer, batch, "float32")), mine.get((layer, batch, "bfloat16"))
            if f32 is None or bf16 is None:
                continue
            dense = f32["dense_f32_highest_us"]
            ours32, ours16 = f32["sparse_us"] / dense, bf16["sparse_us"] / dense
            b32, b16 = ours32 / (peer32 / xla), ours16 / (sputnik16 / xla)
            behind["float32"].append(b32)
            behind["bfloat16"].append(b16)
            print(f"| {layer} ({f32['m']}x{f32['k']}) | {batch} | {ours32:.2f} | {peer32 / xla:.2f} | {b32:.2f} | "
                  f"{ours16:.2f} | {sputnik16 / xla:.2f} | {b16:.2f} | {f32['bcsr_f32_us'] / dense:.2f} |")
    for dt, vals in behind.items():
        if vals:
            print(f"\ngeomean x behind ({dt}): {math.exp(sum(map(math.log, vals)) / len(vals)):.2f} "
                  f"(> 1: slower than the peer)")


if __name__ == "__main__":
    main()
