"""Benchmark: finetune/dedup.py's two costs, hashing images and grouping hashes.

1. Hashing: ``--images`` generated 96x96 PNGs (smooth random pictures) hashed as dedup.py does
   (content hash + perceptual hash); reports images per second.
2. Grouping alone on random 64-bit hashes, at ``--hashes`` and at 1/4 and 1/16 of it, with
   ``n // 100`` planted near pairs (1 to --threshold bits apart): reports the seconds of each size,
   the pairs found against the pairs planted, and the growth exponent between the smallest and the
   largest size (1 is linear, 2 is all pairs; n log n reads as a little above 1).

    .venv/bin/python bench/bench_dedup.py [--images 10000] [--hashes 1000000] [--threshold 5]

The last line of the output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench_hashing(count: int) -> dict:
    from library.prep.dedup import collect_facts
    from library.prep.files import RunSummary
    from tests.prep.test_dedup import smooth

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(count):
            paths.append(Path(tmp) / f"{i:06d}.png")
            smooth(i, size=96).save(paths[-1])
        start = time.perf_counter()
        facts = collect_facts(paths, "phash", 8, RunSummary())
        seconds = time.perf_counter() - start
    return {"images": len(facts), "seconds": round(seconds, 3), "images_per_s": round(len(facts) / seconds, 1)}


def planted_hashes(n: int, threshold: int, rng: random.Random) -> tuple[list[int], int]:
    hashes = [rng.getrandbits(64) for _ in range(n)]
    planted = n // 100
    for k in range(planted):
        source = hashes[2 * k]
        hashes[2 * k + 1] = source ^ sum(1 << b for b in rng.sample(range(64), rng.randint(1, threshold)))
    return hashes, planted


def bench_grouping(n: int, threshold: int) -> dict:
    from library.prep.near_duplicates import choose_chunks, near_pairs

    hashes, planted = planted_hashes(n, threshold, random.Random(n))
    start = time.perf_counter()
    pairs = near_pairs(hashes, 64, threshold)
    seconds = time.perf_counter() - start
    found = {(a, b) for a, b, _ in pairs}
    return {"n": n, "chunks": choose_chunks(n, 64, threshold), "seconds": round(seconds, 3),
            "pairs_found": len(pairs), "pairs_planted": planted,
            "planted_found": sum((2 * k, 2 * k + 1) in found for k in range(planted))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--hashes", type=int, default=1000000)
    p.add_argument("--threshold", type=int, default=5)
    args = p.parse_args()
    hashing = bench_hashing(args.images)
    print(f"hashing: {hashing}", flush=True)
    sizes = [max(100, args.hashes // 16), max(100, args.hashes // 4), args.hashes]
    grouping = []
    for n in sizes:
        grouping.append(bench_grouping(n, args.threshold))
        print(f"grouping: {grouping[-1]}", flush=True)
    first, last = grouping[0], grouping[-1]
    growth = math.log(max(last["seconds"], 1e-6) / max(first["seconds"], 1e-6)) / math.log(last["n"] / first["n"])
    print(json.dumps({"hashing": hashing, "grouping": grouping, "growth_exponent": round(growth, 2)}))


if __name__ == "__main__":
    main()
