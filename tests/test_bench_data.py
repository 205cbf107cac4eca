"""tools/bench_quality.py --data: a user's folder becomes a MiniLM task, or a clear error."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_quality as bq  # noqa: E402


def _folder(tmp_path, *names):
    d = tmp_path / "my_intents"
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_text("text,label\nhello,a\n")
    return d


def test_train_and_test_found_dev_optional(tmp_path):
    d = _folder(tmp_path, "train.csv", "test.jsonl")
    name, spec = bq.data_task(d, "utterance", "intent")
    assert name == "my_intents"
    assert (spec["train"], spec["dev"], spec["test"]) == ("train.csv", None, "test.jsonl")
    assert (spec["field"], spec["label"], spec["dir"]) == ("utterance", "intent", str(d))
    name, spec = bq.data_task(_folder(tmp_path / "b", "train.tsv", "dev.tsv", "test.tsv"), "t", "l")
    assert spec["dev"] == "dev.tsv"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["train.csv"], "no test file"),
        (["test.csv"], "no train file"),
        (["train.csv", "train.jsonl", "test.csv"], "several train files (train.csv, train.jsonl)"),
    ],
)
def test_bad_folder_is_one_line_naming_it(tmp_path, files, message):
    d = _folder(tmp_path, *files)
    with pytest.raises(SystemExit) as e:
        bq.data_task(d, "text", "label")
    assert message in str(e.value) and str(d) in str(e.value)
    assert "\n" not in str(e.value)


def test_builtin_name_and_missing_folder_refused(tmp_path):
    with pytest.raises(SystemExit, match="built-in"):
        bq.data_task(
            _folder(tmp_path, "train.csv", "test.csv").rename(tmp_path / "clinc150"), "t", "l"
        )
    with pytest.raises(SystemExit, match="not a folder"):
        bq.data_task(tmp_path / "absent", "t", "l")
