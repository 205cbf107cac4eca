"""Templates: parse ptedge's prompt DSL and turn records into token ids.

This is the one implementation of encoding that training (``ptedge.model``) and the
torch-free runtime (``ptedge.runtime``) share, so both see the same ids. It imports
only numpy and ``tokenizers``.

Syntax: literal text; ``{field}`` = a record field; ``[P:n]`` = n pseudo tokens (``[P]``
= one); ``[MASK]`` = the answer slot. Whitespace before a field belongs to the field's
text (so byte-level BPE sees `` France``); whitespace before ``[MASK]`` belongs to the
answer (the verbalizer word "positive" is scored as the token `` positive``).

A template is *compiled* once per tokenizer into a JSON-able dict (literal pieces as
ids, field slots, pseudo ranges, the backbone's special tokens); encoding then only
tokenizes field text. The compiled dict is what bundles store (see docs/bundle-format.md).

Not responsible for: reading data files (``ptedge.data``), fetching backbones,
anything about the model itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DEFAULT_MAX_LENGTH = 128

_TOKEN_RE = re.compile(r"\{([^{}]*)\}|\[P(?::([^\]]*))?\]|\[MASK\]")
_FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class TemplateError(ValueError):
    """A template, verbalizer or record that cannot be encoded; one line, names the culprit."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Pseudo:
    count: int


@dataclass(frozen=True)
class Mask:
    pass


Segment = Text | Field | Pseudo | Mask


def parse(template: str, *, need_slot: bool = True) -> list[Segment]:
    """Split a template string into segments; raises TemplateError on unknown tokens.

    ``need_slot=False`` also accepts a template without ``[MASK]`` (a head that reads
    no slot, e.g. an imported PEFT classifier that pools the first token).
    """
    segments: list[Segment] = []
    pos = 0
    for m in _TOKEN_RE.finditer(template):
        if m.start() > pos:
            segments.append(Text(template[pos : m.start()]))
        token = m.group(0)
        if token.startswith("{"):
            name = m.group(1)
            if not _FIELD_NAME_RE.match(name):
                raise TemplateError(f"template: bad field name {token!r}")
            segments.append(Field(name))
        elif token == "[MASK]":
            segments.append(Mask())
        else:
            count = m.group(2)
            if count is None:
                segments.append(Pseudo(1))
            elif re.fullmatch(r"[0-9]+", count) and int(count) > 0:
                segments.append(Pseudo(int(count)))
            else:
                raise TemplateError(f"template: unknown token {token!r} (use [P] or [P:n], n >= 1)")
        pos = m.end()
    if pos < len(template):
        segments.append(Text(template[pos:]))
    masks = sum(isinstance(s, Mask) for s in segments)
    if masks > 1 or (need_slot and masks == 0):
        need = "exactly" if need_slot else "at most"
        raise TemplateError(
            f"template {template!r} needs {need} one [MASK] (the answer slot), found {masks}"
        )
    return segments


def fields_of(template: str) -> list[str]:
    """The record fields a template reads, in order of first use."""
    names = [s.name for s in parse(template) if isinstance(s, Field)]
    return list(dict.fromkeys(names))


def pseudo_count(template: str) -> int:
    """How many pseudo tokens the template holds."""
    return sum(s.count for s in parse(template) if isinstance(s, Pseudo))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one in a folder) with padding and truncation off."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_affixes(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single text."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    raise TemplateError("tokenizer: cannot locate the special tokens its post-processor adds")


def compile_template(
    template: str,
    tok: Tokenizer,
    *,
    causal: bool,
    mask_id: int | None,
    pad_id: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    pseudo_base: int = 0,
    peft_layout: bool = False,
) -> dict:
    """Compile a template for one tokenizer into a JSON-able dict.

    ``causal``: the answer is the next token after the last input token ([MASK] must be
    last, nothing is inserted for it, no suffix specials follow). Otherwise ``mask_id``
    is inserted at the slot and the answer is read there. Pseudo token k of this
    template gets id ``pseudo_base + k``.

    ``peft_layout``: PEFT's placement, for imported adapters: the template starts with
    ``[P:n]``, which goes *before* the tokenizer's prefix specials ([CLS], BOS), and
    ``[MASK]`` is optional (without it the slot is position 0).
    """
    segments = parse(template, need_slot=not peft_layout)
    if peft_layout and not (segments and isinstance(segments[0], Pseudo)):
        raise TemplateError(f"template {template!r}: a PEFT layout must start with [P:n]")
    has_slot = any(isinstance(s, Mask) for s in segments)
    if (
        causal
        and not isinstance(segments[-1], Mask)
        and not (
            isinstance(segments[-1], Text)
            and not segments[-1].text.strip()
            and isinstance(segments[-2], Mask)
        )
    ):
        raise TemplateError(f"template {template!r}: for a causal LM, [MASK] must be the last item")
    if not causal and mask_id is None and has_slot:
        raise TemplateError("backbone tokenizer has no mask token; its templates need one")
    out: list[dict] = []
    pending_ws = ""
    offset = 0
    answer_prefix = ""
    for i, seg in enumerate(segments):
        if isinstance(seg, Text):
            text = seg.text.lstrip() if i == 0 else seg.text
            body = text.rstrip()
            pending_ws = text[len(body) :]
            if body:
                out.append({"ids": tok.encode(body, add_special_tokens=False).ids})
            continue
        if isinstance(seg, Field):
            out.append({"field": seg.name, "prefix": " " if pending_ws else ""})
        elif isinstance(seg, Pseudo):
            out.append({"pseudo": [offset, seg.count]})
            offset += seg.count
        else:
            answer_prefix = " " if pending_ws else ""
            out.append({"slot": True})
            if causal:
                break
        pending_ws = ""
    prefix, suffix = special_affixes(tok)
    compiled = {
        "template": template,
        "segments": out,
        "prefix_ids": prefix,
        "suffix_ids": [] if causal else suffix,
        "causal": causal,
        "mask_id": None if causal else mask_id,
        "pad_id": pad_id,
        "max_length": max_length,
        "pseudo_base": pseudo_base,
        "pseudo_count": offset,
        "answer_prefix": answer_prefix,
        "pseudo_first": peft_layout,
    }
    fixed = _fixed_length(compiled)
    if fixed >= max_length:
        raise TemplateError(
            f"template {template!r} alone takes {fixed} tokens, max length is {max_length}"
        )
    return compiled


def _fixed_length(c: dict) -> int:
    n = len(c["prefix_ids"]) + len(c["suffix_ids"])
    for s in c["segments"]:
        if "ids" in s:
            n += len(s["ids"])
        elif "pseudo" in s:
            n += s["pseudo"][1]
        elif "slot" in s and not c["causal"]:
            n += 1
    return n


def with_pseudo_base(compiled: dict, base: int) -> dict:
    """The same compiled template with its pseudo ids moved to start at ``base``."""
    return {**compiled, "pseudo_base": base}


def answer_ids(
    compiled: dict, tok: Tokenizer, words: list[str], *, strict: bool = True
) -> list[int | None]:
    """The single token id of each answer word as it appears at the slot.

    ``strict``: a word that is not one token raises TemplateError naming it; otherwise
    its entry is None (LAMA: such facts are skipped and counted).
    """
    ids: list[int | None] = []
    encs = tok.encode_batch(
        [compiled["answer_prefix"] + w for w in words], add_special_tokens=False
    )
    for word, enc in zip(words, encs, strict=True):
        if len(enc.ids) == 1:
            ids.append(enc.ids[0])
        elif strict:
            pieces = "+".join(enc.tokens)
            raise TemplateError(
                f"verbalizer word {word!r} is {len(enc.ids)} tokens ({pieces}), must be one"
            )
        else:
            ids.append(None)
    return ids


@dataclass
class Encoded:
    """A padded batch. ``slot[b]`` is the position whose output predicts the answer."""

    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    slot: np.ndarray  # (B,) int64
    truncated: np.ndarray  # (B,) int64, field tokens dropped per record


def record_fields(compiled: dict) -> list[str]:
    return list(dict.fromkeys(s["field"] for s in compiled["segments"] if "field" in s))


def encode(
    compiled: dict,
    tok: Tokenizer,
    records: list[dict],
    *,
    targets: list[list[int]] | None = None,
    padding_side: str = "right",
) -> Encoded:
    """Encode records with a compiled template into one padded batch.

    Only field text is truncated (longest field first, keeping its start). A record
    missing a field raises ``ValueError`` naming the field. ``targets`` (causal LMs,
    generation training) appends those ids after the slot, uncounted in max length.
    """
    field_segs = [s for s in compiled["segments"] if "field" in s]
    field_ids = _field_ids(compiled, tok, records)
    budget = compiled["max_length"] - _fixed_length(compiled)
    base = compiled["pseudo_base"]
    rows: list[list[int]] = []
    slots: list[int] = []
    truncated: list[int] = []
    nf = len(field_segs)
    segments, lead = compiled["segments"], range(0)
    if compiled.get("pseudo_first"):  # PEFT: the leading [P:n] goes before the specials
        start, count = segments[0]["pseudo"]
        segments, lead = segments[1:], range(base + start, base + start + count)
    for b in range(len(records)):
        pieces = field_ids[b * nf : (b + 1) * nf]
        keep = _fit([len(p) for p in pieces], budget)
        truncated.append(sum(len(p) for p in pieces) - sum(keep))
        ids = list(lead) + list(compiled["prefix_ids"])
        slot = 0  # a template without [MASK] (PEFT layout) reads position 0
        fi = 0
        for s in segments:
            if "ids" in s:
                ids.extend(s["ids"])
            elif "field" in s:
                ids.extend(pieces[fi][: keep[fi]])
                fi += 1
            elif "pseudo" in s:
                start, count = s["pseudo"]
                ids.extend(range(base + start, base + start + count))
            elif compiled["causal"]:
                slot = len(ids) - 1
            else:
                slot = len(ids)
                ids.append(compiled["mask_id"])
        if slot < 0:
            raise ValueError(
                f"record {b}: nothing precedes [MASK] (empty field?), a causal LM has no answer"
            )
        ids.extend(compiled["suffix_ids"])
        if targets is not None:
            ids.extend(targets[b])
        rows.append(ids)
        slots.append(slot)
    return _pad(rows, slots, truncated, compiled["pad_id"], padding_side)


def lengths(compiled: dict, tok: Tokenizer, records: list[dict]) -> list[int]:
    """Tokens each record takes under the template with nothing truncated (specials,
    pseudo tokens and the slot included): what ``max_length`` must be for it to fit."""
    nf = sum("field" in s for s in compiled["segments"])
    sizes = [len(ids) for ids in _field_ids(compiled, tok, records)]
    fixed = _fixed_length(compiled)
    return [fixed + sum(sizes[b * nf : (b + 1) * nf]) for b in range(len(records))]


def _field_ids(compiled: dict, tok: Tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of each record's fields, record by record, field occurrences in order."""
    texts: list[str] = []
    for r in records:
        for s in compiled["segments"]:
            if "field" not in s:
                continue
            value = r.get(s["field"])
            if value is None:
                raise ValueError(f"record is missing field {s['field']!r} (the template needs it)")
            texts.append(s["prefix"] + str(value))
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []


def _pad(
    rows: list[list[int]], slots: list[int], truncated: list[int], pad_id: int, side: str
) -> Encoded:
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    slot = np.asarray(slots, dtype=np.int64)
    for b, r in enumerate(rows):
        if side == "left":
            shift = width - len(r)
            ids[b, shift:] = r
            mask[b, shift:] = 1
            slot[b] += shift
        else:
            ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
    return Encoded(ids, mask, slot, np.asarray(truncated, dtype=np.int64))


def _fit(lengths: list[int], budget: int) -> list[int]:
    """Field lengths after longest-first truncation to fit ``budget`` tokens in all."""
    if sum(lengths) <= budget:
        return lengths
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap c with sum(min(l, c)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = [min(n, lo) for n in lengths]
    spare = budget - sum(keep)
    for i, n in enumerate(lengths):
        if spare and n > lo:
            keep[i] += 1
            spare -= 1
    return keep
