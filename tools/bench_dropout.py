"""The frozen backbone's dropout while the prompt trains: off, or on as pre-trained.

The backbone's weights are frozen either way. Off, every training step sees the
backbone as inference will; on, its own dropout (all-MiniLM-L6-v2: 0.1 on hidden states
and attention) regularises the prompt encoder and the linear head learned from scratch,
as PEFT and the paper's code train. The question: which should the default be?

Each candidate is the README's command with ``--backbone-dropout`` or
``--no-backbone-dropout`` added, on ``tools/_variants.py``'s sets: small draws of 20 per
label, ``tools/small_sets.py``'s sets, and the full tasks' dev splits; records no run saw,
one thread a run, ``--workers`` at a time.

    python tools/bench_dropout.py     # writes docs/results/dropout.{json,md}
"""

from __future__ import annotations

import time

import _variants
import bench_defaults

CANDIDATES = {"off": ["--no-backbone-dropout"], "on": ["--backbone-dropout"]}
SHIPPED = "on"  # what ptedge.defaults.backbone_dropout chooses for the linear head
TITLE = "The backbone's dropout while the prompt trains (records no run saw)"
INTRO = "`off`: `--no-backbone-dropout`; `on`: `--backbone-dropout`; `--pool mean` both."


def markdown(result: dict) -> str:
    return _variants.markdown(result, TITLE, INTRO, SHIPPED)


def main(argv: list[str] | None = None) -> None:
    a = bench_defaults.study_parser(__doc__, "dropout").parse_args(argv)
    _variants.report(a, "dropout", CANDIDATES, markdown, time.perf_counter())


if __name__ == "__main__":
    main()
