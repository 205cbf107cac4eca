"""Which mean the linear head reads: over every token, or over the record's own tokens.

``--pool mean`` averages the backbone's last hidden states over every attended position,
the prompt's pseudo tokens and ``[MASK]`` included; ``--pool text`` leaves those out and
averages the record's own tokens (and the backbone's special tokens, as a
sentence-transformers mean does). The question: which should the default be?

Each candidate is the README's command with ``--pool`` added (and the backbone's dropout
off, as the default was when this study was made), on ``tools/_variants.py``'s sets:
small draws of 20 per label, ``tools/small_sets.py``'s sets, and the full tasks' dev
splits; records no run saw, one thread a run, ``--workers`` at a time.

    python tools/bench_pool.py     # writes docs/results/pool.{json,md}
"""

from __future__ import annotations

import time

import _variants
import bench_defaults

CANDIDATES = {
    "mean": ["--pool", "mean", "--no-backbone-dropout"],
    "text": ["--pool", "text", "--no-backbone-dropout"],
}
SHIPPED = "mean"  # what ptedge.defaults.pool chooses
TITLE = "The linear head's mean: every token, or the record's own (records no run saw)"
INTRO = (
    "`--pool mean` is the mean over every token, pseudo tokens and [MASK] included; "
    "`--pool text` over the record's own tokens and the special tokens; both with "
    "`--no-backbone-dropout`."
)


def markdown(result: dict) -> str:
    return _variants.markdown(result, TITLE, INTRO, SHIPPED)


def main(argv: list[str] | None = None) -> None:
    a = bench_defaults.study_parser(__doc__, "pool").parse_args(argv)
    _variants.report(a, "pool", CANDIDATES, markdown, time.perf_counter())


if __name__ == "__main__":
    main()
