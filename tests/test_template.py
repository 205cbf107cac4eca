"""Tests for ptedge.template: parsing, compiling per tokenizer family, encoding, truncation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptedge.template import (
    Field,
    Mask,
    Pseudo,
    TemplateError,
    Text,
    answer_ids,
    compile_template,
    encode,
    fields_of,
    load_tokenizer,
    parse,
    pseudo_count,
    special_affixes,
    with_pseudo_base,
)

# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tok(tiny):
    """WordPiece with [CLS] ... [SEP], from the tiny BERT folder."""
    return load_tokenizer(tiny("bert"))


@pytest.fixture(scope="module")
def gpt2_tok(tiny):
    """Byte-level BPE without special affixes, from the tiny GPT-2 folder."""
    return load_tokenizer(tiny("gpt2"))


@pytest.fixture(scope="module")
def toks(bert_tok, gpt2_tok):
    return {"bert": bert_tok, "gpt2": gpt2_tok}


def mlm(template: str, tok, **kw) -> dict:
    kw.setdefault("pseudo_base", tok.get_vocab_size())
    return compile_template(
        template, tok, causal=False, mask_id=tok.token_to_id("[MASK]"), pad_id=0, **kw
    )


def causal(template: str, tok, **kw) -> dict:
    kw.setdefault("pseudo_base", tok.get_vocab_size())
    return compile_template(template, tok, causal=True, mask_id=None, pad_id=0, **kw)


def fixed_tokens(c: dict) -> int:
    """Tokens a compiled template takes besides its field text (the contract's 'fixed' part)."""
    n = len(c["prefix_ids"]) + len(c["suffix_ids"])
    for s in c["segments"]:
        if "ids" in s:
            n += len(s["ids"])
        elif "pseudo" in s:
            n += s["pseudo"][1]
        elif "slot" in s and not c["causal"]:
            n += 1
    return n


def rows_of(enc) -> list[list[int]]:
    """The unpadded rows of a batch (any padding side)."""
    return [
        [int(i) for i, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    ]


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# -- parse --------------------------------------------------------------------------------


def test_parse_segments():
    segs = parse("[P:3] {sentence} [P] It was [MASK] .")
    assert segs == [
        Pseudo(3),
        Text(" "),
        Field("sentence"),
        Text(" "),
        Pseudo(1),
        Text(" It was "),
        Mask(),
        Text(" ."),
    ]


def test_parse_adjacent_tokens_and_plain_text():
    assert parse("[P][P:2]{a}{b}[MASK]") == [
        Pseudo(1),
        Pseudo(2),
        Field("a"),
        Field("b"),
        Mask(),
    ]
    # a stray brace is literal text, not a field
    assert parse("a { b [MASK]") == [Text("a { b "), Mask()]


def test_fields_and_pseudo_count():
    t = "{premise} [P:2] {hypothesis} [P] {premise} [MASK] [P:4]"
    assert fields_of(t) == ["premise", "hypothesis"]
    assert pseudo_count(t) == 7
    assert pseudo_count("{x} [MASK]") == 0


@pytest.mark.parametrize("token", ["[P:x]", "[P:0]", "[P:-1]", "[P:]", "[P: 2]", "[P:1.5]"])
def test_parse_bad_pseudo_token(token):
    with pytest.raises(TemplateError) as e:
        parse(f"{token} {{s}} [MASK]")
    assert token in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_unicode_digit_is_a_template_error():
    with pytest.raises(TemplateError, match=r"\[P:²\]"):
        parse("[P:²] {s} [MASK]")


@pytest.mark.parametrize(
    ("template", "found"),
    [("{s} It was", 0), ("[P] {s}", 0), ("{s} [MASK] and [MASK]", 2), ("[MASK][MASK][MASK]", 3)],
)
def test_parse_needs_exactly_one_mask(template, found):
    with pytest.raises(TemplateError, match=rf"exactly one \[MASK\].*found {found}"):
        parse(template)


@pytest.mark.parametrize("bad", ["{}", "{ s }", "{1x}", "{a b}"])
def test_parse_bad_field_name(bad):
    with pytest.raises(TemplateError, match="bad field name"):
        parse(f"{bad} [MASK]")


# -- compile ------------------------------------------------------------------------------


def test_special_affixes(bert_tok, gpt2_tok):
    cls, sep = bert_tok.token_to_id("[CLS]"), bert_tok.token_to_id("[SEP]")
    assert special_affixes(bert_tok) == ([cls], [sep])
    assert special_affixes(gpt2_tok) == ([], [])


def test_compile_wordpiece(bert_tok):
    tok = bert_tok
    c = mlm("[P:2] {sentence} [P] It was [MASK] .", tok, max_length=32)
    assert c["prefix_ids"] == [tok.token_to_id("[CLS]")]
    assert c["suffix_ids"] == [tok.token_to_id("[SEP]")]
    assert c["mask_id"] == tok.token_to_id("[MASK]")
    assert c["pseudo_count"] == 3
    assert c["pseudo_base"] == tok.get_vocab_size()
    assert c["causal"] is False
    assert c["segments"][0] == {"pseudo": [0, 2]}
    assert c["segments"][1] == {"field": "sentence", "prefix": " "}
    assert c["segments"][2] == {"pseudo": [2, 1]}
    assert c["segments"][3] == {"ids": ids(tok, " It was")}
    assert c["segments"][4] == {"slot": True}
    assert c["answer_prefix"] == " "

    enc = encode(c, tok, [{"sentence": "the movie was great"}])
    v = tok.get_vocab_size()
    expected = (
        [tok.token_to_id("[CLS]"), v, v + 1]
        + ids(tok, " the movie was great")
        + [v + 2]
        + ids(tok, " It was")
        + [tok.token_to_id("[MASK]")]
        + ids(tok, " .")
        + [tok.token_to_id("[SEP]")]
    )
    assert enc.input_ids.tolist() == [expected]
    assert enc.input_ids[0, enc.slot[0]] == tok.token_to_id("[MASK]")
    assert enc.truncated.tolist() == [0]


def test_compile_byte_level_bpe(gpt2_tok):
    tok = gpt2_tok
    c = causal("[P:2] {sentence} [P] It was [MASK]", tok)
    assert c["prefix_ids"] == [] and c["suffix_ids"] == []
    assert c["mask_id"] is None and c["causal"] is True
    enc = encode(c, tok, [{"sentence": "the movie was great"}])
    v = tok.get_vocab_size()
    expected = [v, v + 1] + ids(tok, " the movie was great") + [v + 2] + ids(tok, " It was")
    assert enc.input_ids.tolist() == [expected]
    # causal: nothing is inserted for the slot; it is the last token before the answer
    assert enc.slot.tolist() == [len(expected) - 1]


def test_compile_is_json_roundtrippable(bert_tok):
    import json

    c = mlm("[P:2] {sentence} [MASK]", bert_tok)
    assert json.loads(json.dumps(c)) == c


def test_whitespace_before_field_becomes_prefix(gpt2_tok):
    tok = gpt2_tok
    spaced = causal("[P] {x} [MASK]", tok)
    glued = causal("[P]{x}[MASK]", tok)
    first = causal("{x} [MASK]", tok)
    assert spaced["segments"][1] == {"field": "x", "prefix": " "}
    assert glued["segments"][1] == {"field": "x", "prefix": ""}
    assert first["segments"][0] == {"field": "x", "prefix": ""}
    v = tok.get_vocab_size()
    rec = [{"x": "france"}]
    assert encode(spaced, tok, rec).input_ids[0].tolist() == [v] + ids(tok, " france")
    assert encode(glued, tok, rec).input_ids[0].tolist() == [v] + ids(tok, "france")
    assert ids(tok, " france") != ids(tok, "france")  # the prefix matters for BPE


def test_leading_whitespace_of_template_is_dropped(gpt2_tok):
    c = causal("  {x} [MASK]", gpt2_tok)
    assert c["segments"][0] == {"field": "x", "prefix": ""}


def test_answer_prefix(gpt2_tok, bert_tok):
    assert causal("{x} is [MASK]", gpt2_tok)["answer_prefix"] == " "
    assert causal("{x} is:[MASK]", gpt2_tok)["answer_prefix"] == ""
    assert mlm("{x} is [MASK] .", bert_tok)["answer_prefix"] == " "
    assert mlm("{x} is[MASK].", bert_tok)["answer_prefix"] == ""
    assert causal("[P] [MASK]", gpt2_tok)["answer_prefix"] == " "


@pytest.mark.parametrize("template", ["[P] {x} [MASK] .", "[MASK] {x}", "{x} [MASK][P]"])
def test_causal_needs_mask_last(gpt2_tok, bert_tok, template):
    with pytest.raises(TemplateError, match="must be the last"):
        causal(template, gpt2_tok)
    mlm(template, bert_tok)  # the same template is fine for a masked LM


def test_causal_allows_trailing_whitespace_after_mask(gpt2_tok):
    a = causal("[P] {x} [MASK]", gpt2_tok)
    b = causal("[P] {x} [MASK]  \n", gpt2_tok)
    assert a["segments"] == b["segments"]


def test_mlm_needs_a_mask_token(gpt2_tok):
    with pytest.raises(TemplateError, match="no mask token"):
        compile_template("{x} [MASK]", gpt2_tok, causal=False, mask_id=None, pad_id=0)


def test_template_longer_than_max_length(bert_tok):
    with pytest.raises(TemplateError, match=r"alone takes \d+ tokens, max length is 6"):
        mlm("[P:5] {x} [MASK]", bert_tok, max_length=6)  # CLS + 5 + MASK + SEP = 8


def test_with_pseudo_base(gpt2_tok):
    c = causal("[P:2] {x} [MASK]", gpt2_tok)
    moved = with_pseudo_base(c, 1000)
    assert moved["pseudo_base"] == 1000 and c["pseudo_base"] == gpt2_tok.get_vocab_size()
    assert encode(moved, gpt2_tok, [{"x": "a"}]).input_ids[0, :2].tolist() == [1000, 1001]


# -- answer ids ---------------------------------------------------------------------------


def test_answer_ids_single_tokens(gpt2_tok, bert_tok):
    c = causal("{x} It was [MASK]", gpt2_tok)
    assert answer_ids(c, gpt2_tok, ["great", "terrible"]) == [
        gpt2_tok.token_to_id("Ġgreat"),
        gpt2_tok.token_to_id("Ġterrible"),
    ]
    c = mlm("{x} It was [MASK] .", bert_tok)
    assert answer_ids(c, bert_tok, ["great", "bad"]) == [
        bert_tok.token_to_id("great"),
        bert_tok.token_to_id("bad"),
    ]


def test_answer_ids_strict_names_the_word(gpt2_tok):
    c = causal("{x} It was [MASK]", gpt2_tok)
    with pytest.raises(TemplateError, match="'xyzzy'") as e:
        answer_ids(c, gpt2_tok, ["great", "xyzzy"])
    assert "must be one" in str(e.value)


def test_answer_ids_non_strict_gives_none(gpt2_tok):
    c = causal("{x} It was [MASK]", gpt2_tok)
    out = answer_ids(c, gpt2_tok, ["great", "xyzzy", "france"], strict=False)
    assert out[0] == gpt2_tok.token_to_id("Ġgreat")
    assert out[1] is None
    assert out[2] == gpt2_tok.token_to_id("Ġfrance")


# -- encode -------------------------------------------------------------------------------

SENTS = [
    {"sentence": "the movie was great"},
    {"sentence": "bad"},
    {"sentence": "good fun for the whole family and the actors were wonderful"},
]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_pseudo_ids_in_order(toks, family):
    tok = toks[family]
    make = mlm if family == "bert" else causal
    c = make("[P:3] {sentence} [P:2] It was [P] [MASK]", tok)
    enc = encode(c, tok, SENTS)
    base = tok.get_vocab_size()
    for row in rows_of(enc):
        assert [i for i in row if i >= base] == list(range(base, base + 6))


def test_mlm_slot_points_at_mask(bert_tok):
    c = mlm("[P:3] {sentence} [P:2] It was [MASK] .", bert_tok)
    for side in ("right", "left"):
        enc = encode(c, bert_tok, SENTS, padding_side=side)
        for b in range(len(SENTS)):
            assert enc.input_ids[b, enc.slot[b]] == bert_tok.token_to_id("[MASK]")
            assert enc.attention_mask[b, enc.slot[b]] == 1


def test_causal_slot_is_last_token_before_answer(gpt2_tok):
    c = causal("[P:3] {sentence} [P:2] It was [MASK]", gpt2_tok)
    last = ids(gpt2_tok, " It was")[-1]
    right = encode(c, gpt2_tok, SENTS)
    lengths = right.attention_mask.sum(1)
    assert right.slot.tolist() == (lengths - 1).tolist()
    assert all(right.input_ids[b, right.slot[b]] == last for b in range(len(SENTS)))
    left = encode(c, gpt2_tok, SENTS, padding_side="left")
    width = left.input_ids.shape[1]
    assert left.slot.tolist() == [width - 1] * len(SENTS)


def test_causal_slot_with_targets_stays_before_answer(gpt2_tok):
    c = causal("[P] {sentence} It was [MASK]", gpt2_tok)
    plain = encode(c, gpt2_tok, SENTS[:2])
    with_t = encode(c, gpt2_tok, SENTS[:2], targets=[[5, 6], [7]])
    assert with_t.slot.tolist() == plain.slot.tolist()
    r = rows_of(with_t)
    assert r[0][-2:] == [5, 6] and r[1][-1:] == [7]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_padding_sides(toks, family):
    tok = toks[family]
    make = mlm if family == "bert" else causal
    c = make("[P:2] {sentence} [MASK]", tok)
    right = encode(c, tok, SENTS, padding_side="right")
    left = encode(c, tok, SENTS, padding_side="left")
    assert right.input_ids.shape == left.input_ids.shape
    assert right.input_ids.dtype == np.int64 and right.attention_mask.dtype == np.int64
    assert rows_of(right) == rows_of(left)
    for b, n in enumerate(right.attention_mask.sum(1)):
        assert right.attention_mask[b].tolist() == [1] * n + [0] * (right.input_ids.shape[1] - n)
        assert left.attention_mask[b].tolist() == [0] * (left.input_ids.shape[1] - n) + [1] * n
        assert (right.input_ids[b, n:] == 0).all()  # pad_id
        assert (left.input_ids[b, : left.input_ids.shape[1] - n] == 0).all()
    # the slot moves with the row under left padding
    shift = right.input_ids.shape[1] - right.attention_mask.sum(1)
    assert left.slot.tolist() == (right.slot + shift).tolist()


def test_missing_field_names_it(gpt2_tok):
    c = causal("{premise} [P] {hypothesis} [MASK]", gpt2_tok)
    with pytest.raises(ValueError, match="'hypothesis'"):
        encode(c, gpt2_tok, [{"premise": "a", "hypothesis": "b"}, {"premise": "a"}])
    with pytest.raises(ValueError, match="'premise'"):
        encode(c, gpt2_tok, [{"premise": None, "hypothesis": "b"}])


def test_non_string_field_values_are_text(gpt2_tok):
    c = causal("{x} [MASK]", gpt2_tok)
    a = encode(c, gpt2_tok, [{"x": 42}])
    b = encode(c, gpt2_tok, [{"x": "42"}])
    assert a.input_ids.tolist() == b.input_ids.tolist()


def test_truncation_drops_only_field_text(bert_tok):
    c = mlm("[P:2] {sentence} [MASK]", bert_tok, max_length=12)
    long = {"sentence": " ".join(["the movie was great"] * 10)}
    enc = encode(c, bert_tok, [long, {"sentence": "bad"}])
    row = rows_of(enc)[0]
    assert len(row) == 12
    full = ids(bert_tok, " " + long["sentence"])
    kept = row[3:-2]  # CLS P P | field | MASK SEP
    assert kept == full[: len(kept)]
    assert enc.truncated.tolist() == [len(full) - len(kept), 0]


def test_truncation_longest_field_first(gpt2_tok):
    c = causal("{a} [P] {b} [MASK]", gpt2_tok, max_length=11)  # budget 10
    short = "bad plot"
    enc = encode(c, gpt2_tok, [{"a": short, "b": " ".join(["the movie was great"] * 8)}])
    row = rows_of(enc)[0]
    assert len(row) == 11
    a_ids = ids(gpt2_tok, short)
    assert row[: len(a_ids)] == a_ids  # the short field is kept whole


def test_causal_record_with_nothing_before_the_slot_is_an_error(gpt2_tok):
    c = causal("{x}[MASK]", gpt2_tok)
    with pytest.raises(ValueError):
        encode(c, gpt2_tok, [{"x": "the movie was great"}, {"x": ""}])


# -- properties ---------------------------------------------------------------------------

WORDS = ["the", "movie", "was", "great", "terrible", "paris", "ünïcödé", "日本語", "!", "xyzzy"]
FIELD_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=400).map(" ".join),  # very long ones too
)
TEMPLATES = {
    "bert": "[P:2] {a} [P] {b} It was [MASK] . [P:2]",
    "gpt2": "[P:2] {a} [P] {b} It was [MASK]",
}


def _compiled(toks, family: str, max_length: int) -> dict:
    make = mlm if family == "bert" else causal
    return make(TEMPLATES[family], toks[family], max_length=max_length)


def _field_parts(c: dict, row: list[int], slot: int) -> tuple[list[int], list[int]]:
    """The kept ids of fields a and b in a row of TEMPLATES."""
    base = c["pseudo_base"]
    p1, p2 = row.index(base + 1), row.index(base + 2)
    lit = c["segments"][4]["ids"]  # " It was"
    return row[p1 + 1 : p2], row[p2 + 1 : slot - (len(lit) - 1 if c["causal"] else len(lit))]


@settings(max_examples=50, deadline=None)
@given(
    family=st.sampled_from(["bert", "gpt2"]),
    records=st.lists(
        st.fixed_dictionaries({"a": FIELD_TEXT, "b": FIELD_TEXT}), min_size=1, max_size=4
    ),
    extra=st.integers(1, 60),
    side=st.sampled_from(["right", "left"]),
)
def test_encode_properties(toks, family, records, extra, side):
    tok = toks[family]
    fixed = fixed_tokens(_compiled(toks, family, 1000))
    max_length = fixed + extra
    c = _compiled(toks, family, max_length)
    base, n = c["pseudo_base"], c["pseudo_count"]
    enc = encode(c, tok, records, padding_side=side)
    rows = rows_of(enc)
    assert enc.input_ids.shape[0] == len(records) == len(rows)
    width = enc.input_ids.shape[1]
    for b, (rec, row) in enumerate(zip(records, rows, strict=True)):
        slot = int(enc.slot[b]) - (width - len(row) if side == "left" else 0)
        # (a) every pseudo id and the slot survive truncation
        assert [i for i in row if i >= base] == list(range(base, base + n))
        if c["causal"]:
            assert slot == len(row) - 1
        else:
            assert row[slot] == c["mask_id"]
            assert row[: len(c["prefix_ids"])] == c["prefix_ids"]
            assert row[len(row) - len(c["suffix_ids"]) :] == c["suffix_ids"]
        # (b) the template fits, so every row does
        assert len(row) <= max_length
        # (c) no id beyond the last pseudo id, none negative
        assert 0 <= min(row) and max(row) <= base + n - 1
        # (e) truncated counts the dropped field tokens; kept text is each field's start
        full_a, full_b = ids(tok, " " + rec["a"]), ids(tok, " " + rec["b"])
        kept_a, kept_b = _field_parts(c, row, slot)
        assert kept_a == full_a[: len(kept_a)] and kept_b == full_b[: len(kept_b)]
        dropped = len(full_a) + len(full_b) - len(kept_a) - len(kept_b)
        assert enc.truncated[b] == dropped == len(full_a) + len(full_b) - (len(row) - fixed)
        if dropped:
            assert len(row) == max_length  # truncation only when needed, then to the limit
            # longest first: a truncated field keeps at least as much as the other, minus one
            for kept, full, other in ((kept_a, full_a, kept_b), (kept_b, full_b, kept_a)):
                if len(kept) < len(full):
                    assert len(kept) >= len(other) - 1
        # (d) deterministic and batch-independent
        alone = encode(c, tok, [rec], padding_side=side)
        assert rows_of(alone) == [row]
        assert alone.truncated.tolist() == [enc.truncated[b]]
    again = encode(c, tok, records, padding_side=side)
    assert np.array_equal(again.input_ids, enc.input_ids)
    assert np.array_equal(again.slot, enc.slot)
    reverse = encode(c, tok, records[::-1], padding_side=side)
    assert rows_of(reverse) == rows[::-1]


@settings(max_examples=50, deadline=None)
@given(family=st.sampled_from(["bert", "gpt2"]), short=st.integers(0, 40))
def test_template_that_does_not_fit_is_rejected(toks, family, short):
    fixed = fixed_tokens(_compiled(toks, family, 1000))
    max_length = max(1, fixed - short)
    with pytest.raises(TemplateError, match="alone takes"):
        _compiled(toks, family, max_length)
