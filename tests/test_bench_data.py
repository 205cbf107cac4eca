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


def test_debian_descriptions_become_one_record_per_source_package():
    import debian_sets as ds

    words = " ".join(f"w{i}" for i in range(30))
    packages = (
        "Package: a\nSection: games\nDescription-md5: m1\n\n"
        "Package: a-data\nSource: a\nSection: games\nDescription-md5: m2\n\n"
        "Package: b\nSection: sound\nDescription-md5: m3\n\n"
        "Package: c\nSection: libs\nDescription-md5: m1\n\n"
        "Package: d\nSection: web\nDescription-md5: m4\n"
    )
    descriptions = (
        f"Package: a\nDescription-md5: m1\nDescription-en: a game\n {words}\n .\n more\n\n"
        f"Package: a-data\nDescription-md5: m2\nDescription-en: its data\n {words}\n\n"
        f"Package: b\nDescription-md5: m3\nDescription-en: too short\n a few words\n\n"
        f"Package: d\nDescription-md5: m4\nDescription-en: a browser\n {words}\n"
    )
    got = ds.by_section(packages, descriptions)
    assert set(got) == {"games", "web"}  # libs is not a section used; b is too short
    assert got["games"] == {"a": f"a game. {words} more"}  # a-data shares a's source
    assert got["web"]["d"].startswith("a browser. w0 w1")
