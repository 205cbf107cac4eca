"""A long-text topic set no default was chosen on: Debian package descriptions by section.

Downloads Debian bookworm's package index and its English descriptions from
deb.debian.org (``main/binary-amd64/Packages.xz``, ``main/i18n/Translation-en.xz``; about
15 MB, Debian's archive is reachable where PyPI is) and writes
``runs/unseen/debian-4/{train,test}.csv``. A record is a package's short description,
". ", and the first 120 words of its long description (``text``, up to 503 tokens with the
README's template), labelled with its section (``label``: games, science, sound or web).
One package per source package (the first in the index), so no two records share a
description; descriptions of fewer than 25 words are left out. Per section a seeded 30%
of the source packages is the test split (828 records); the rest, shuffled, gives up to
300 training records per section (1,124). Prints the sha256 of the downloaded and
written files: the index moves with bookworm's point releases, and the results in
``docs/results/analyses.md`` ("a long-text set") were measured on the files whose hashes
it gives.

Not a benchmark itself: run ``python tools/bench_quality.py --data runs/unseen/debian-4``.

    python tools/debian_sets.py
"""

from __future__ import annotations

import collections
import csv
import hashlib
import lzma
import random
import urllib.request
from pathlib import Path

import _bench_common as bc

RUNS = bc.ROOT / "runs"

ARCHIVE = "http://deb.debian.org/debian/dists/bookworm/main/"
FILES = {"packages": "binary-amd64/Packages.xz", "descriptions": "i18n/Translation-en.xz"}
SECTIONS = ("games", "sound", "science", "web")
MIN_WORDS, MAX_WORDS, TEST_SHARE, TRAIN_CAP, SEED = 25, 120, 0.3, 300, 1


def stanzas(text: str):
    """Each stanza of a Debian control file as {field: value}; continuation lines are
    joined to their field with newlines."""
    rec, key = {}, None
    for line in text.split("\n"):
        if not line:
            if rec:
                yield rec
            rec, key = {}, None
        elif line.startswith(" ") and key:
            rec[key] += "\n" + line
        else:
            key, _, val = line.partition(":")
            rec[key] = val.strip()
    if rec:
        yield rec


def fetch(name: str, cache: Path) -> str:
    """The decompressed text of an index file, downloaded once into ``cache``."""
    path = cache / Path(FILES[name]).name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(ARCHIVE + FILES[name], timeout=120) as r:
            path.write_bytes(r.read())
    print(f"{path.name}: sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def by_section(packages: str, descriptions: str) -> dict[str, dict[str, str]]:
    """{section: {source package: text}} for ``SECTIONS``."""
    long = {r["Description-md5"]: r["Description-en"] for r in stanzas(descriptions)}
    out: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for r in stanzas(packages):
        desc = long.get(r.get("Description-md5", ""))
        if r.get("Section") not in SECTIONS or not desc:
            continue
        short, _, rest = desc.partition("\n")
        words = " ".join(x.strip() for x in rest.split("\n") if x.strip() != ".").split()
        if len(words) < MIN_WORDS:
            continue
        source = r.get("Source", r["Package"]).split()[0]
        out[r["Section"]].setdefault(source, f"{short}. {' '.join(words[:MAX_WORDS])}")
    return out


def main() -> None:
    texts = by_section(fetch("packages", RUNS / "debian"), fetch("descriptions", RUNS / "debian"))
    rng = random.Random(SEED)
    train, test = [], []
    for section in SECTIONS:
        items = sorted(texts[section].items())
        rng.shuffle(items)
        n_test = int(len(items) * TEST_SHARE)
        for i, (_, text) in enumerate(items):
            (test if i < n_test else train).append({"text": text, "label": section})
    rng.shuffle(train)
    seen: collections.Counter = collections.Counter()
    kept = []
    for r in train:
        if seen[r["label"]] < TRAIN_CAP:
            seen[r["label"]] += 1
            kept.append(r)
    folder = RUNS / "unseen" / "debian-4"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", kept), ("test.csv", test)):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["text", "label"])
            w.writeheader()
            w.writerows(rows)
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        print(f"{folder / name}: {len(rows)} records, sha256 {digest}")


if __name__ == "__main__":
    main()
