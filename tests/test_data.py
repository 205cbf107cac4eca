"""Tests for ptedge.data: jsonl/csv/tsv reading, line numbers and one-line DataErrors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptedge.data import (
    MAX_FIELDS_NAMED,
    SUPPORTED_EXTENSIONS,
    DataError,
    Records,
    labels_of,
    missing_field,
    read_records,
    require_fields,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data set {relative} not found under {SHARED_DATA}")
    return path


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    return message


# -- round trips ---------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.jsonl",
        '{"text": "good", "label": "1"}\n'
        "\n"
        '   \n{"text": "bad", "label": 0, "score": 0.5, "flag": true, "note": null}\n',
    )
    records = read_records(path)
    assert isinstance(records, Records) and isinstance(records, list)
    assert records == [
        {"text": "good", "label": "1"},
        {"text": "bad", "label": "0", "score": "0.5", "flag": "True"},
    ]
    assert records.lines == [1, 4]
    assert records.path == str(path)
    assert records.fields == ["text", "label", "score", "flag"]
    assert records.where(1) == f"{path}:4"


def test_jsonl_keeps_unicode_line_separators(tmp_path: Path) -> None:
    # U+2028 is legal raw inside a JSON string; it must not split the line.
    path = write(tmp_path / "u.jsonl", '{"text": "a\u2028b\u0085c"}\n{"text": "d"}\n')
    records = read_records(path)
    assert records == [{"text": "a\u2028b\u0085c"}, {"text": "d"}]
    assert records.lines == [1, 2]


def test_csv_round_trip_with_quoted_commas_and_newlines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "data.csv",
        'text,category\n"I ordered it, a week ago.",card_arrival\n'
        '"he said ""hi""",greeting\n"two\nlines",multi\nplain,last\n',
    )
    records = read_records(path)
    assert records == [
        {"text": "I ordered it, a week ago.", "category": "card_arrival"},
        {"text": 'he said "hi"', "category": "greeting"},
        {"text": "two\nlines", "category": "multi"},
        {"text": "plain", "category": "last"},
    ]
    # a record spanning lines 4-5 starts on line 4; the next one is on line 6
    assert records.lines == [2, 3, 4, 6]
    assert records.fields == ["text", "category"]


def test_csv_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.csv"
    path.write_bytes("\ufefftext,label\r\nhello,1\r\n\r\nworld,0\r\n".encode())
    records = read_records(path)
    assert records == [{"text": "hello", "label": "1"}, {"text": "world", "label": "0"}]
    assert records.fields == ["text", "label"]  # the BOM is not part of the first column
    assert records.lines == [2, 4]


def test_tsv_round_trip_keeps_quotes_literally(tmp_path: Path) -> None:
    # GLUE convention: no quoting, so quotes (even unbalanced ones) are literal characters
    path = write(
        tmp_path / "train.tsv",
        'sentence\tlabel\n"a quoted" film , \t1\nit \'s "great\t0\n"\t1\n\nx,y "z"\t0\n',
    )
    records = read_records(path)
    assert records == [
        {"sentence": '"a quoted" film , ', "label": "1"},
        {"sentence": "it 's \"great", "label": "0"},
        {"sentence": '"', "label": "1"},
        {"sentence": 'x,y "z"', "label": "0"},
    ]
    assert records.lines == [2, 3, 4, 6]


def test_tsv_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.tsv"
    path.write_bytes("\ufeffsentence\tlabel\r\nfine\t1\r\n".encode())
    records = read_records(path)
    assert records == [{"sentence": "fine", "label": "1"}]
    assert records.fields == ["sentence", "label"]


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "DATA.TSV", "a\tb\n1\t2\n")
    assert read_records(path) == [{"a": "1", "b": "2"}]


# -- file-level errors ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        read_records(path)
    assert one_line(err) == f"{path}: no such file"
    assert isinstance(err.value, ValueError)


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.csv"
    path.mkdir()
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize(
    "name,text",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.csv", ""),
        ("header.csv", "text,label\n"),
        ("header_blank.csv", "text,label\n\n\n"),
        ("empty.tsv", ""),
        ("header.tsv", "sentence\tlabel\n"),
    ],
)
def test_no_records(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert one_line(err) == f"{path}: no records"


@pytest.mark.parametrize("name", ["data.txt", "data.json", "data"])
def test_unknown_extension_lists_supported(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "{}\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert name in message
    for ext in SUPPORTED_EXTENSIONS:
        assert ext in message


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,1\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:3: ")
    assert "UTF-8" in message
    assert err.value.line == 3


# -- line-level errors ---------------------------------------------------------------------


def test_jsonl_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", '{"a": "1"}\n\n{"a": "2",}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert one_line(err).startswith(f"{path}:3: invalid JSON")
    assert err.value.path == str(path) and err.value.line == 3


@pytest.mark.parametrize("value,kind", [("[1, 2]", "array"), ('"text"', "string"), ("3", "number")])
def test_jsonl_non_object_names_the_line(tmp_path: Path, value: str, kind: str) -> None:
    path = write(tmp_path / "train.jsonl", '{"a": "1"}\n' + value + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:2: ")
    assert "object" in message and kind in message


def test_csv_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", "text,category\nfine,a\nI ordered it, a week ago,b\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:3: ")
    assert "2" in message and "3" in message


def test_csv_unclosed_quote_names_the_line_it_opens_on(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", 'text\nfine\n"never closed\nmore\nlines\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:3: ")
    assert "quoted" in message


def test_csv_duplicate_header_column(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", "text,label,text\na,b,c\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:1: ")
    assert "'text'" in message and err.value.field == "text"


def test_tsv_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = one_line(err)
    assert message.startswith(f"{path}:3: ")
    assert "tab" in message


def test_tsv_missing_tab_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n\n\nno label here\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert one_line(err).startswith(f"{path}:5: ")


# -- require_fields and labels_of ----------------------------------------------------------


def test_require_fields_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.jsonl",
        '{"sub_label": "Rauma", "obj_label": "Finnish"}\n\n{"obj_label": "German"}\n',
    )
    records = read_records(path)
    require_fields(records, ["obj_label"])
    require_fields(records, [])
    with pytest.raises(DataError) as err:
        require_fields(records, ["obj_label", "sub_label"], reason="template needs it")
    assert one_line(err) == (
        f"{path}:3: missing field 'sub_label' (template needs it); the record has 'obj_label'"
    )
    assert err.value.field == "sub_label" and err.value.line == 3
    with pytest.raises(DataError) as err:
        require_fields(records, "sub_label")  # a lone string is one field, not characters
    assert one_line(err) == f"{path}:3: missing field 'sub_label'; the record has 'obj_label'"


def test_missing_field_names_what_the_record_has() -> None:
    """A user whose file says `sentence` where the template says `{text}` sees both."""
    assert missing_field("text", {"sentence": "a", "label": "1"}, "template needs it") == (
        "missing field 'text' (template needs it); the record has 'sentence', 'label'"
    )
    assert missing_field("text", {}) == "missing field 'text'; the record has no fields"
    wide = {f"f{i}": "" for i in range(MAX_FIELDS_NAMED + 3)}
    assert missing_field("text", wide).endswith(f"'f{MAX_FIELDS_NAMED - 1}' and 3 more")


def test_require_fields_csv_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", "txt,category\nhello,a\n")
    with pytest.raises(DataError) as err:
        require_fields(read_records(path), {"text"})
    assert one_line(err) == f"{path}:2: missing field 'text'; the record has 'txt', 'category'"


def test_require_fields_empty_value_counts_as_present(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", "text,label\n,1\n")
    require_fields(read_records(path), ["text", "label"])


def test_require_fields_on_plain_list() -> None:
    with pytest.raises(DataError) as err:
        require_fields([{"a": "1"}, {}], ["a"])
    assert one_line(err) == "<records>:2: missing field 'a'; the record has no fields"


def test_labels_of(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "sentence\tlabel\na\t1\nb\t0\nc\t1\n")
    assert labels_of(read_records(path), "label") == ["1", "0", "1"]


@pytest.mark.parametrize(
    "name,text,line,what",
    [
        ("train.jsonl", '{"s": "a", "label": "x"}\n{"s": "b"}\n', 2, "missing"),
        ("train.jsonl", '{"s": "a", "label": "x"}\n\n{"s": "b", "label": null}\n', 3, "missing"),
        ("train.jsonl", '{"s": "a", "label": " "}\n', 1, "empty"),
        ("train.csv", "s,label\na,x\nb,\n", 3, "empty"),
        ("train.tsv", "s\tlabel\na\tx\n\nb\t\n", 4, "empty"),
    ],
)
def test_labels_of_missing_or_empty(
    tmp_path: Path, name: str, text: str, line: int, what: str
) -> None:
    path = write(tmp_path / name, text)
    records = read_records(path)
    with pytest.raises(DataError) as err:
        labels_of(records, "label")
    message = one_line(err)
    assert message.startswith(f"{path}:{line}: ")
    assert what in message and "'label'" in message
    assert err.value.field == "label"


def test_data_error_is_one_line_whatever_the_field() -> None:
    err = DataError("missing field 'a\nb'", path="dir\nname.csv", line=7, field="a\nb")
    assert "\n" not in str(err)
    assert str(DataError("plain")) == "plain"


# -- the real shared data sets -------------------------------------------------------------


def test_real_sst2_test() -> None:
    path = shared("sst2/test.tsv")
    records = read_records(path)
    assert len(records) == 872
    assert records.fields == ["sentence", "label"]
    require_fields(records, ["sentence", "label"])
    assert set(labels_of(records, "label")) == {"0", "1"}
    assert records.lines[0] == 2 and records.lines[-1] == 873


def test_real_banking77_test() -> None:
    path = shared("banking77/test.csv")
    records = read_records(path)
    assert len(records) == 3080
    assert records.fields == ["text", "category"]
    require_fields(records, ["text", "category"])
    labels = labels_of(records, "category")
    categories = SHARED_DATA / "banking77" / "categories.json"
    if categories.is_file():
        assert set(labels) <= set(json.loads(categories.read_text(encoding="utf-8")))
    assert any("," in r["text"] for r in records)  # quoted commas really occur here


def test_real_trex_p37() -> None:
    path = shared("trex/test/P37.jsonl")
    records = read_records(path)
    expected = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(records) == expected > 0
    require_fields(records, ["sub_label", "obj_label", "sub_uri", "obj_uri"])
    assert all(labels_of(records, "obj_label"))


def test_module_is_torch_free() -> None:
    code = (
        "import sys, ptedge.data; "
        "heavy = {'torch', 'transformers', 'optimum', 'numpy', 'onnxruntime', 'tokenizers'}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- property: anything written in a supported format reads back equal ---------------------

# No surrogates (not encodable), no control characters except where allowed below, and no
# U+FEFF (a leading one would be taken as a BOM).
_SAFE = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufeff")
_TEXT_WITH_BREAKS = st.text(st.one_of(_SAFE, st.sampled_from('\n\r\t,"')), max_size=20)
_TEXT_ONE_LINE = st.text(st.one_of(_SAFE, st.sampled_from(',"')), max_size=20)


@st.composite
def _tables(draw: st.DrawFn, text: st.SearchStrategy[str]) -> list[dict[str, str]]:
    keys = draw(st.lists(text, min_size=1, max_size=4, unique=True))
    rows = draw(st.lists(st.tuples(*[text for _ in keys]), min_size=1, max_size=6))
    return [dict(zip(keys, row, strict=True)) for row in rows]


_HYPO = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_HYPO
@given(
    records=st.lists(st.dictionaries(_TEXT_WITH_BREAKS, _TEXT_WITH_BREAKS, max_size=4), min_size=1)
)
def test_property_jsonl(tmp_path: Path, records: list[dict[str, str]]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    back = read_records(path)
    assert back == records
    assert back.lines == list(range(1, len(records) + 1))


@_HYPO
@given(records=_tables(_TEXT_WITH_BREAKS))
def test_property_csv(tmp_path: Path, records: list[dict[str, str]]) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    assert read_records(path) == records


@_HYPO
@given(records=_tables(_TEXT_ONE_LINE))
def test_property_tsv(tmp_path: Path, records: list[dict[str, str]]) -> None:
    keys = list(records[0])
    lines = ["\t".join(keys)] + ["\t".join(r[k] for k in keys) for r in records]
    if any(not line for line in lines):
        # A one-column table with an empty cell is an empty line, which TSV skips by design.
        return
    path = tmp_path / "p.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    back = read_records(path)
    assert back == records
    assert back.lines == list(range(2, len(records) + 2))
