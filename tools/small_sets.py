"""Small training sets cut from the shared data, for trying ptedge's defaults on data sizes
they were not chosen on (`python tools/bench_quality.py --data runs/unseen/NAME`).

Writes, from one `random.Random(1)` in this order:

- `runs/unseen/b77-20pl/`: 20 training sentences per BANKING77 intent (1,540; shuffled),
  `test.csv` the full BANKING77 test split;
- `runs/unseen/sst2-1k/`: 1,000 SST-2 training sentences, `test.tsv` the full test split.

Neither has a dev file, so ptedge carves one. Not a benchmark itself; results in
`docs/results/analyses.md` ("small training sets").

    python tools/small_sets.py
"""

from __future__ import annotations

import csv
import random
import shutil
from collections import defaultdict

import _bench_common as bc

PER_INTENT, SST2_N, SEED = 20, 1000, 1


def main() -> None:
    rng = random.Random(SEED)
    out = bc.ROOT / "runs" / "unseen"
    b77, sst2 = bc.need_data("banking77"), bc.need_data("sst2")

    with open(b77 / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_intent: dict[str, list] = defaultdict(list)
    for r in rows:
        by_intent[r["category"]].append(r)
    keep = [r for k in sorted(by_intent) for r in rng.sample(by_intent[k], PER_INTENT)]
    rng.shuffle(keep)
    folder = out / "b77-20pl"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["text", "category"])
        w.writeheader()
        w.writerows(keep)
    shutil.copy(b77 / "test.csv", folder / "test.csv")

    header, *body = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    folder = out / "sst2-1k"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header, *rng.sample(body, SST2_N)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(sst2 / "test.tsv", folder / "test.tsv")
    print(f"wrote {out / 'b77-20pl'} ({len(keep)} records), {folder} ({SST2_N} records)")


if __name__ == "__main__":
    main()
