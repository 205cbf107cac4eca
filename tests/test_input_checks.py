"""Every command checks its input first: a data file that lacks a field the template
reads, a label, or a known label stops train, eval, export, import-peft, predict and
info with one line naming the file (and line) and the field, exit 1, no output folder,
and before any backbone is loaded.

One tiny GPT-2 run (verbalizer labels "0"/"1") and its bundle are built once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from conftest import write_jsonl  # noqa: E402

from ptedge.cli import main  # noqa: E402
from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.train import TrainArgs, train  # noqa: E402

TEMPLATE = "[P:2] {sentence} [P:2] It was [MASK]"
VERBALIZER = {"0": "terrible", "1": "great"}
GOOD = ["good fun for the whole family", "the movie was great", "wonderful actors"]
BAD = ["a terrible boring film", "bad plot", "the film was terrible"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checks")
    recs = [{"sentence": s, "label": "1"} for s in GOOD] + [
        {"sentence": s, "label": "0"} for s in BAD
    ]
    data = write_jsonl(root / "sent.jsonl", recs * 2)
    run = root / "runs" / "sst"
    args = TrainArgs(
        model=str(tiny("gpt2")),
        train=str(data),
        template=TEMPLATE,
        verbalizer=VERBALIZER,
        out=str(run),
        steps=2,
        batch_size=4,
        max_length=32,
    )
    train(args, progress=False)
    bundle = root / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    return {"root": root, "data": data, "run": run, "bundle": bundle, "model": tiny("gpt2")}


@pytest.fixture
def no_backbone(monkeypatch):
    """Fail the test if any backbone is loaded: the checks must come first."""

    def refuse(*a, **k):
        raise AssertionError("a backbone was loaded before the input was checked")

    import ptedge.export.runs
    import ptedge.model
    import ptedge.train

    for module in (ptedge.model, ptedge.train, ptedge.export.runs):
        monkeypatch.setattr(module, "load_backbone", refuse)


def one_line_error(result) -> str:
    """Exit 1, one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def run_cli(*args) -> str:
    return one_line_error(CliRunner().invoke(main, [str(a) for a in args]))


@pytest.fixture
def text_file(tmp_path) -> Path:
    """Records whose text is in field ``text``, not the template's ``sentence``."""
    return write_jsonl(tmp_path / "text.jsonl", [{"text": "great fun", "label": "1"}] * 3)


# -- export -------------------------------------------------------------------------------


def test_export_eval_file_without_the_template_field(work, text_file, tmp_path, no_backbone):
    """The issue's case: it died with `cannot reshape tensor of 0 elements`."""
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--eval", text_file)
    assert f"{text_file}:1: missing field 'sentence'" in line and "'sst'" in line
    assert not out.exists()


def test_export_int8_eval_file_with_an_unknown_label(work, tmp_path, no_backbone):
    data = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "fun", "label": "1"}] * 2)
    with data.open("a") as f:
        f.write(json.dumps({"sentence": "meh", "label": "neutral"}) + "\n")
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--eval", data, "--quantize", "int8")
    assert f"{data}:3:" in line and "'neutral'" in line and "'label'" in line
    assert not out.exists()


def test_export_int8_eval_file_without_labels(work, tmp_path, no_backbone):
    data = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "fun"}])
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--eval", data, "--quantize", "int8")
    assert f"{data}:1: missing label field 'label'" in line
    assert not out.exists()


def test_export_eval_file_without_labels_for_calibration(work, tmp_path, no_backbone):
    """Even without int8: export calibrates classifiers on the --eval records' labels."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "fun", "label": "1"}, {"sentence": "x"}])
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--eval", data)
    assert f"{data}:2: missing label field 'label'" in line
    assert not out.exists()


def test_export_reject_file_without_the_template_field(work, text_file, tmp_path, no_backbone):
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--reject", text_file)
    assert f"{text_file}:1: missing field 'sentence'" in line
    assert not out.exists()


def test_export_missing_eval_file(work, tmp_path, no_backbone):
    out = tmp_path / "bundle"
    line = run_cli("export", work["run"], "--out", out, "--eval", tmp_path / "nope.csv")
    assert "nope.csv: no such file" in line
    assert not out.exists()


def _seq_cls_adapter(folder: Path, n_virtual: int = 2, hidden: int = 32) -> Path:
    """A PEFT P-tuning SEQ_CLS adapter for tiny("bert"), written as PEFT saves one."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"peft_type": "P_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": n_virtual}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {
        "prompt_embeddings": torch.randn(n_virtual, hidden, generator=g),
        "base_model.classifier.weight": torch.randn(2, hidden, generator=g),
        "base_model.classifier.bias": torch.zeros(2),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_import_peft_default_field_then_export_on_text_data(tiny, text_file, tmp_path):
    """The issue's second case: --field defaults to `sentence`, the data says `text`."""
    adapter = _seq_cls_adapter(tmp_path / "adapter")
    run = tmp_path / "imported"
    res = CliRunner().invoke(
        main, ["import-peft", str(adapter), "--model", str(tiny("bert")), "--out", str(run)]
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "bundle"
    line = run_cli("export", run, "--out", out, "--eval", text_file)
    assert f"{text_file}:1: missing field 'sentence'" in line
    assert not out.exists()


def test_import_peft_data_without_the_field(tiny, text_file, tmp_path, no_backbone):
    adapter = _seq_cls_adapter(tmp_path / "adapter")
    run = tmp_path / "imported"
    line = run_cli(
        "import-peft", adapter, "--model", tiny("bert"), "--out", run, "--data", text_file
    )
    assert f"{text_file}:1: missing field 'sentence'" in line and "--field" in line
    assert not run.exists()


# -- eval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_eval_data_without_the_template_field(work, text_file, target, no_backbone):
    line = run_cli("eval", work[target], "--data", text_file)
    assert f"{text_file}:1: missing field 'sentence'" in line


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_eval_data_with_an_unknown_label(work, tmp_path, target, no_backbone):
    data = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "fun", "label": "positive"}])
    line = run_cli("eval", work[target], "--data", data)
    assert f"{data}:1:" in line and "'positive'" in line and "'label'" in line


@pytest.mark.parametrize("target", ["run", "bundle"])
def test_eval_data_with_an_empty_label(work, tmp_path, target, no_backbone):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"sentence": "a", "label": "1"}, {"sentence": "b", "label": " "}]
    )
    line = run_cli("eval", work[target], "--data", data)
    assert f"{data}:2: empty label field 'label'" in line


# -- train --------------------------------------------------------------------------------


def _train(work, out, *extra):
    return (
        "train", "--model", work["model"], "--train", work["data"], "--template", TEMPLATE,
        "--verbalizer", json.dumps(VERBALIZER), "--steps", "1", "--out", out, *extra,
    )  # fmt: skip


def test_train_dev_record_without_a_label(work, tmp_path, no_backbone):
    dev = write_jsonl(
        tmp_path / "dev.jsonl", [{"sentence": "fun", "label": "1"}, {"sentence": "x"}]
    )
    out = tmp_path / "run"
    line = run_cli(*_train(work, out, "--dev", dev))
    assert f"{dev}:2: missing" in line and "'label'" in line
    assert not out.exists()


def test_train_label_outside_the_verbalizer(work, tmp_path, no_backbone):
    data = write_jsonl(
        tmp_path / "t.jsonl", [{"sentence": "fun", "label": "1"}, {"sentence": "x", "label": "2"}]
    )
    out = tmp_path / "run"
    args = list(_train(work, out))
    args[args.index("--train") + 1] = data
    line = run_cli(*args)
    assert f"{data}:2:" in line and "'2'" in line
    assert not out.exists()


def test_train_linear_dev_label_unseen_in_training(work, tmp_path, no_backbone):
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "fun", "label": "maybe"}])
    out = tmp_path / "run"
    args = [a for a in _train(work, out, "--dev", dev, "--head", "linear")]
    i = args.index("--verbalizer")
    del args[i : i + 2]
    line = run_cli(*args)
    assert f"{dev}:1:" in line and "'maybe'" in line
    assert not out.exists()


# -- predict and info ---------------------------------------------------------------------


def test_predict_csv_header_without_the_template_field(work, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngreat,1\n")
    line = run_cli("predict", work["bundle"], "--input", data)
    assert f"{data}:" in line and "'sentence'" in line


@pytest.mark.parametrize("command", ["predict", "info"])
def test_bundle_commands_on_a_run_folder(work, command):
    line = run_cli(command, work["run"])
    assert "run folder, not a bundle" in line and "ptedge export" in line


@pytest.mark.parametrize("command", ["predict", "info"])
def test_bundle_commands_on_a_missing_folder(tmp_path, command):
    line = run_cli(command, tmp_path / "nowhere")
    assert "nowhere" in line and "no such bundle" in line
