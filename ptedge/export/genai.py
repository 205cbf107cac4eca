"""``--format genai``: a bundle folder that onnxruntime-genai also loads as it is.

onnxruntime-genai (the runtime behind onnxruntime's LLM APIs for Python, C, C#, Java,
Android and iOS) cannot take a soft prompt (it has no ``inputs_embeds`` input). A fused
ptedge prompt needs none: the prompt is vocabulary. The folder holds

- ``model.onnx`` (or ``model.int4.onnx`` ...): the builder's decoder with the prompt rows
  grafted in (``ptedge.export.causal.build_decoder``), LM head at V outputs;
- ``tokenizer.json`` with the prompt's pseudo tokens as added special tokens
  ``<|ptedge:k|>`` (ids ``V + k``), and the builder's ``tokenizer_config.json``;
- ``genai_config.json`` (the builder's, pointing at the model file);
- ``ptedge.json``: an ordinary bundle manifest (``ptedge.runtime.Predictor`` runs the
  same folder) with ``genai.prompt``, the exact text a client passes to onnxruntime-genai,
  each record field as ``{field}`` (Python ``str.format`` syntax; literal braces doubled).

``check_genai`` loads the folder with onnxruntime-genai (in the builder's environment,
which has it) and requires its prompt token ids and greedy tokens to equal ptedge's on
real records.

Not responsible for: building the graph (``causal``), the manifest (``bundle``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from ptedge.template import Field, Mask, Pseudo, Text, encode, load_tokenizer, parse

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHECK_NEW_TOKENS = 16  # greedy tokens compared per record

# run by the builder environment's python: argv = folder, prompts JSON file, new tokens
_CHECK_SCRIPT = """
import json, sys
import onnxruntime_genai as og
folder, prompts, new = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
model = og.Model(folder)
tok = og.Tokenizer(model)
rows = []
for text in prompts:
    ids = [int(i) for i in tok.encode(text)]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    seq = [int(i) for i in gen.get_sequence(0)]
    rows.append({"ids": ids, "new": seq[len(ids):], "text": tok.decode(seq[len(ids):])})
print(json.dumps(rows))
"""


class GenaiError(RuntimeError):
    """The genai folder does not reproduce ptedge's prompt ids or greedy tokens."""


def pseudo_token(k: int) -> str:
    return f"<|ptedge:{k}|>"


def prompt_text(template: str, pseudo_base: int = 0) -> str:
    """The text of a causal template up to its slot, pseudo tokens as ``<|ptedge:k|>``,
    fields as ``{field}``; whitespace handled as ``ptedge.template.compile_template`` does."""
    parts: list[str] = []
    pending = ""
    offset = pseudo_base
    for i, seg in enumerate(parse(template)):
        if isinstance(seg, Text):
            text = seg.text.lstrip() if i == 0 else seg.text
            body = text.rstrip()
            pending = text[len(body) :]
            parts.append(body.replace("{", "{{").replace("}", "}}"))
            continue
        if isinstance(seg, Field):
            parts.append((" " if pending else "") + "{" + seg.name + "}")
        elif isinstance(seg, Pseudo):
            parts.append("".join(pseudo_token(offset + k) for k in range(seg.count)))
            offset += seg.count
        elif isinstance(seg, Mask):
            break
        pending = ""
    return "".join(parts)


def write_tokenizer(src: Path, dst: Path, vocab_size: int, n_pseudo: int) -> None:
    """``src`` tokenizer.json plus the pseudo tokens as added special tokens at V.."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src))
    tokens = [pseudo_token(k) for k in range(n_pseudo)]
    clash = [t for t in tokens if tok.token_to_id(t) is not None]
    if clash:
        raise GenaiError(f"{src}: the tokenizer already has tokens {clash}")
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise GenaiError(
            f"{src}: {tok.get_vocab_size(with_added_tokens=True)} tokens, the backbone's "
            f"embedding has {vocab_size} rows; pseudo ids would not follow on"
        )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in tokens]
    )
    ids = [tok.token_to_id(t) for t in tokens]
    if ids != list(range(vocab_size, vocab_size + n_pseudo)):
        raise GenaiError(f"pseudo tokens got ids {ids}, expected {vocab_size}..")
    tok.save(str(dst))


def write_folder(folder: Path, run, model_file: str, build_config: dict) -> str:
    """Write the genai files beside ``model_file`` in ``folder``; returns the prompt text."""
    cfg = run.cfg
    write_tokenizer(
        Path(cfg.model) / "tokenizer.json", folder / "tokenizer.json", cfg.vocab_size, cfg.n_pseudo
    )
    src = Path(cfg.model) / TOKENIZER_CONFIG
    if src.is_file():
        shutil.copy(src, folder / TOKENIZER_CONFIG)
    config = {k: v for k, v in build_config.items() if k != "nodes"}
    config["model"]["decoder"]["filename"] = model_file
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    return prompt_text(cfg.template)


def run_genai(python: Path, folder: Path, prompts: list[str], new_tokens: int) -> list[dict]:
    """onnxruntime-genai's prompt ids and greedy new tokens for each prompt (subprocess)."""
    args = folder / ".genai-check-prompts.json"
    args.write_text(json.dumps(prompts))
    try:
        done = subprocess.run(
            [str(python), "-c", _CHECK_SCRIPT, str(folder), str(args), str(new_tokens)],
            capture_output=True,
            text=True,
        )
    finally:
        args.unlink(missing_ok=True)
    if done.returncode:
        raise GenaiError(f"onnxruntime-genai cannot run {folder}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_genai(python: Path, folder: Path, session, run, records: list[dict], prompt: str) -> dict:
    """onnxruntime-genai on the folder vs ptedge's decoder session on the same records:
    prompt ids and greedy tokens must be equal; raises ``GenaiError`` naming the record."""
    from ptedge.export.scoring import onnx_generate

    fields = [s.name for s in parse(run.cfg.template) if isinstance(s, Field)]
    texts = [prompt.format(**{f: r[f] for f in fields}) for r in records]
    got = run_genai(python, folder, texts, CHECK_NEW_TOKENS)
    tok = load_tokenizer(folder / "tokenizer.json")
    want_ids = encode(run.compiled, tok, records)
    eos = run.cfg.eos_id
    want = [onnx_generate(session, run, [r], CHECK_NEW_TOKENS)[0] for r in records]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ids = want_ids.input_ids[i][want_ids.attention_mask[i] == 1].tolist()
        if g["ids"] != ids:
            raise GenaiError(
                f"record {i} ({texts[i]!r}): onnxruntime-genai tokenized the prompt as "
                f"{g['ids']}, ptedge as {ids}"
            )
        new = g["new"][: g["new"].index(eos)] if eos in g["new"] else g["new"]
        if new != w:
            raise GenaiError(
                f"record {i} ({texts[i]!r}): onnxruntime-genai generated {new}, ptedge {w}"
            )
    return {"prompt_ids_equal": 1.0, "greedy_tokens_equal": 1.0, "n": len(records)}
