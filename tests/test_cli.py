"""Tests for ptedge.cli through click's CliRunner: help texts, one-line errors, train and eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ptedge.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Options each command's --help must mention (commands not listed only need to show help).
KEY_OPTIONS = {
    (): ["--debug", "--help", "train", "eval", "backbone"],
    ("backbone",): ["fetch"],
    ("backbone", "fetch"): ["NAME", "smollm2-135m", "minilm-l6"],
    ("train",): [
        "--model",
        "--train",
        "--dev",
        "--template",
        "--label-field",
        "--verbalizer",
        "--head",
        "--encoder",
        "--steps",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--force",
        "--out",
        "lm",
        "linear",
        "lstm",
        "mlp",
    ],
    ("eval",): ["PATH", "--data", "--task", "accuracy"],
    ("export",): ["--quantize", "int4", "--format", "genai", "PTEDGE_GENAI_BUILDER"],
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def all_commands(group: click.Group = main, path: tuple[str, ...] = ()):
    yield path
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*path, name))
        else:
            yield (*path, name)


def one_line_error(result) -> str:
    """Assert a user error: exit 1, one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    lines = [line for line in err.splitlines() if not line.startswith("train:")]  # tqdm
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# -- help ---------------------------------------------------------------------------------


def test_every_command_has_help(runner):
    seen = set()
    for path in all_commands():
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.stdout
        for option in KEY_OPTIONS.get(path, []):
            assert option in result.stdout, (path, option)
        seen.add(path)
    assert set(KEY_OPTIONS) <= seen


def test_short_help_option(runner):
    assert runner.invoke(main, ["train", "-h"]).exit_code == 0


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom ptedge.cli import main\n"
        "r = CliRunner().invoke(main, ['train', '--help'])\n"
        "assert r.exit_code == 0, r.output\nassert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# -- user errors --------------------------------------------------------------------------


def train_argv(model, data, out, *extra, template="[P:2] {sentence} [P] It was [MASK]"):
    return [
        "train",
        "--model",
        str(model),
        "--train",
        str(data),
        "--template",
        template,
        "--out",
        str(out),
        *extra,
    ]


def test_train_missing_model(runner, sentiment_file, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model"
    line = one_line_error(runner.invoke(main, train_argv(missing, sentiment_file, out)))
    assert str(missing) in line
    assert not out.exists()


def test_train_model_folder_without_config(runner, sentiment_file, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(runner.invoke(main, train_argv(tmp_path, sentiment_file, out)))
    assert "config.json" in line
    assert not out.exists()


def test_train_missing_data_file(runner, tiny, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "nope.jsonl"
    line = one_line_error(runner.invoke(main, train_argv(tiny("gpt2"), data, out)))
    assert str(data) in line and "no such file" in line
    assert not out.exists()


def test_train_bad_template(runner, tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny("gpt2"), sentiment_file, out, template="[P:x] {sentence} [MASK]")
    line = one_line_error(runner.invoke(main, argv))
    assert "[P:x]" in line
    assert not out.exists()


def test_train_bad_verbalizer(runner, tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny("gpt2"), sentiment_file, out, "--verbalizer", "{not json")
    assert "--verbalizer" in one_line_error(runner.invoke(main, argv))
    argv = train_argv(tiny("gpt2"), sentiment_file, out, "--verbalizer", '["a"]')
    assert "JSON object" in one_line_error(runner.invoke(main, argv))
    assert not out.exists()


def test_train_dev_label_error_is_one_line(runner, tiny, sentiment_file, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"sentence": "meh", "label": "2"}) + "\n")
    out = tmp_path / "run"
    argv = train_argv(
        tiny("bert"),
        sentiment_file,
        out,
        "--dev",
        str(dev),
        "--steps",
        "2",
        template="{sentence} [P] [MASK]",
    )
    line = one_line_error(runner.invoke(main, argv))
    assert f"{dev}:1:" in line
    assert not out.exists()


def test_train_non_empty_out(runner, tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep")
    argv = train_argv(tiny("bert"), sentiment_file, out, "--steps", "1")
    assert "--force" in one_line_error(runner.invoke(main, argv))
    assert [p.name for p in out.iterdir()] == ["x"]


def test_train_long_inline_verbalizer(runner, tmp_path, sentiment_file):
    verbalizer = json.dumps({str(i): f"word{i}" for i in range(40)})
    assert len(verbalizer) > 255
    out = tmp_path / "run"
    argv = train_argv(tmp_path / "no-such-model", sentiment_file, out, "--verbalizer", verbalizer)
    line = one_line_error(runner.invoke(main, argv))
    assert "no-such-model" in line  # the verbalizer parsed; the next check failed


def test_debug_raises_instead(runner, sentiment_file, tmp_path):
    out = tmp_path / "run"
    argv = ["--debug", *train_argv(tmp_path / "missing", sentiment_file, out)]
    result = runner.invoke(main, argv)
    assert isinstance(result.exception, FileNotFoundError)
    assert not result.stderr.startswith("error:")


def test_debug_prints_traceback(sentiment_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ptedge.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run(
        [*cmd, *train_argv(tmp_path / "missing", sentiment_file, out, template="[MASK] [MASK]")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert plain.returncode == 1
    assert plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
    debug = subprocess.run(
        [
            *cmd,
            "--debug",
            *train_argv(tmp_path / "missing", sentiment_file, out, template="[MASK] [MASK]"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError" in debug.stderr
    assert not out.exists()


def test_eval_missing_run(runner, tmp_path, sentiment_file):
    line = one_line_error(
        runner.invoke(main, ["eval", str(tmp_path / "x"), "--data", str(sentiment_file)])
    )
    assert "no such run or bundle folder" in line


def test_eval_folder_that_is_not_a_run(runner, tmp_path, sentiment_file):
    line = one_line_error(
        runner.invoke(main, ["eval", str(tmp_path), "--data", str(sentiment_file)])
    )
    assert "not a run folder" in line


# -- train and eval -----------------------------------------------------------------------


def test_train_then_eval(runner, tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(
        tiny("bert-mlm"),
        sentiment_file,
        out,
        "--verbalizer",
        '{"0": "bad", "1": "great"}',
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--dev",
        str(sentiment_file),
        template="[P:2] {sentence} it was [MASK] .",
    )
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["steps"] == 3
    assert "dev_accuracy" in summary
    assert (out / "ptedge.json").is_file()

    result = runner.invoke(main, ["eval", str(out), "--data", str(sentiment_file)])
    assert result.exit_code == 0, (result.output, result.exception)
    scores = json.loads(result.stdout)
    assert {"accuracy", "n", "skipped"} <= set(scores)
    assert scores["n"] == 18 and scores["skipped"] == 0
    assert scores["accuracy"] == pytest.approx(summary["dev_accuracy"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "meh", "label": "neutral"}) + "\n")
    line = one_line_error(runner.invoke(main, ["eval", str(out), "--data", str(bad)]))
    assert f"{bad}:1:" in line and "'neutral'" in line


def test_manual_baseline_eval(runner, tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(
        tiny("gpt2"),
        sentiment_file,
        out,
        "--verbalizer",
        '{"0": "terrible", "1": "great"}',
        "--steps",
        "0",
        template="{sentence} It was [MASK]",
    )
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 0
    result = runner.invoke(main, ["eval", str(out), "--data", str(sentiment_file)])
    assert result.exit_code == 0, (result.output, result.exception)
    scores = json.loads(result.stdout)
    assert scores["n"] == 18 and 0.0 <= scores["accuracy"] <= 1.0


def test_verbalizer_from_file(runner, tiny, sentiment_file, tmp_path):
    vfile = tmp_path / "verbalizer.json"
    vfile.write_text(json.dumps({"0": "terrible", "1": "great"}))
    out = tmp_path / "run"
    argv = train_argv(tiny("gpt2"), sentiment_file, out, "--verbalizer", str(vfile), "--steps", "1")
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    cfg = json.loads((out / "ptedge.json").read_text())
    assert cfg["verbalizer"] == {"0": "terrible", "1": "great"} and cfg["labels"] == ["0", "1"]
