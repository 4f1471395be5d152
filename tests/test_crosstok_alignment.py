"""Byte-offset alignment of two tokenisations (potstill/crosstok/alignment.py), with exact hand-derived numbers.

Three local tokenizers, no downloads: W = the built-in word-level one (BOS, no EOS, words split on whitespace),
B = a byte-level BPE with hand-written merges (GPT-2 pre-tokenizer: spaces go with the next word as "Ġ"),
M = a SentencePiece-like Unigram with the Metaspace pre-tokenizer ("▁" prefix)."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, PythonBackend
from transformers.convert_slow_tokenizer import bytes_to_unicode

from potstill.builtin.tokenizer import build_tokenizer
from potstill.crosstok import Chunk, ExactMatch, align, byte_spans

BPE_EOS = "<|endoftext|>"
BPE_MERGES = [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("Ġ", "d"), ("Ġd", "o"), ("Ġdo", "g"),
              ("1", "2"), ("3", "4"), ("34", "5"), ("Ġ", "â"), ("c", "a"), ("ca", "f")]
UNIGRAM_PIECES = ["▁", "▁the", "▁cat", "▁dog", "12", "3", "4", "5", "1", "2", "t", "h", "e", "c", "a", "d", "o", "g"]


def _bpe(with_eos: bool = False) -> PreTrainedTokenizerFast:
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {BPE_EOS: 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    for left, right in BPE_MERGES:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=BPE_MERGES))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if with_eos:
        core.post_processor = processors.TemplateProcessing(single=f"$A {BPE_EOS}", special_tokens=[(BPE_EOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=BPE_EOS)


def _unigram() -> PreTrainedTokenizerFast:
    pieces = [("<unk>", 0.0)] + [(p, -1.0 if len(p) > 1 else -3.0) for p in UNIGRAM_PIECES]
    core = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    word = build_tokenizer(tmp_path_factory.mktemp("crosstok") / "word")
    word_eos_core = Tokenizer.from_str(word.backend_tokenizer.to_str())
    word_eos_core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", word.bos_token_id), ("</s>", word.eos_token_id)])
    word_eos = PreTrainedTokenizerFast(tokenizer_object=word_eos_core, bos_token="<s>", eos_token="</s>")
    return {"W": word, "W_eos": word_eos, "B": _bpe(), "B_eos": _bpe(with_eos=True), "M": _unigram()}


def spans_of(spans):
    return list(zip(spans.starts, spans.ends))


def chunks_of(alignment):
    return [(c.start, c.end, (c.a_tokens.start, c.a_tokens.stop), (c.b_tokens.start, c.b_tokens.stop))
            for c in alignment.chunks]


def test_ascii_word_level_against_bpe_spans_boundaries_and_matches(tokenizers):
    w, b = byte_spans(tokenizers["W"], "the cat"), byte_spans(tokenizers["B"], "the cat")
    assert tokenizers["W"].convert_ids_to_tokens(list(w.ids)) == ["<s>", "the", "cat"]
    assert spans_of(w) == [(0, 0), (0, 3), (4, 7)] and w.special == (True, False, False)
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == ["the", "Ġcat"]
    assert spans_of(b) == [(0, 3), (3, 7)] and b.special == (False, False)
    assert b.pieces == (b"the", b" cat")
    alignment = align(w, b)
    assert alignment.boundaries == (3, 7)
    assert chunks_of(alignment) == [(0, 3, (1, 2), (0, 1)), (3, 7, (2, 3), (1, 2))]
    # "cat" lacks the space "Ġcat" holds: one token each side, but not the same span nor the same piece
    assert alignment.exact == (ExactMatch(1, 0, True, True), ExactMatch(2, 1, False, False))


def test_an_unknown_token_matches_a_span_but_not_a_piece(tokenizers):
    w, b = byte_spans(tokenizers["W"], "x the"), byte_spans(tokenizers["B"], "x the")
    assert tokenizers["W"].convert_ids_to_tokens(list(w.ids)) == ["<s>", "<unk>", "the"]
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == ["x", "Ġ", "the"]
    assert spans_of(b) == [(0, 1), (1, 2), (2, 5)]
    alignment = align(w, b)
    assert alignment.boundaries == (1, 5)
    assert chunks_of(alignment) == [(0, 1, (1, 2), (0, 1)), (1, 5, (2, 3), (1, 3))]
    assert alignment.exact == (ExactMatch(1, 0, True, False),)  # b"<unk>" != b"x": no ordinary divergence there


def test_multibyte_utf8_spans_are_bytes_and_split_characters_go_to_the_last_token(tokenizers):
    text = "café €5 日本"  # bytes: c a f é(2) | ' ' | €(3) | 5 | ' ' | 日(3) | 本(3) = 17
    b = byte_spans(tokenizers["B"], text)
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == [
        "caf", "Ã", "©", "Ġâ", "Ĥ", "¬", "5", "Ġ", "æ", "Ĺ", "¥", "æ", "ľ", "¬"]
    # "Ã" holds é's first byte only: empty span; "©" completes é and gets all of it. "Ġâ" = space + €'s first byte.
    assert spans_of(b) == [(0, 3), (3, 3), (3, 5), (5, 6), (6, 6), (6, 9), (9, 10), (10, 11),
                           (11, 11), (11, 11), (11, 14), (14, 14), (14, 14), (14, 17)]
    w = byte_spans(tokenizers["W"], text)
    assert spans_of(w) == [(0, 0), (0, 5), (6, 10), (11, 17)]  # <s>, then three <unk> words
    alignment = align(w, b)
    assert alignment.boundaries == (5, 10, 17)
    assert chunks_of(alignment) == [(0, 5, (1, 2), (0, 3)), (5, 10, (2, 3), (3, 7)), (10, 17, (3, 4), (7, 14))]
    assert alignment.exact == ()


def test_hf_offsets_overlap_on_split_characters_and_an_emoji_goes_to_its_last_byte_token(tokenizers):
    encoded = tokenizers["B"]("😀x", return_offsets_mapping=True)
    assert encoded["offset_mapping"] == [(0, 1), (0, 1), (0, 1), (0, 1), (1, 2)]  # what HF gives: the whole char
    b = byte_spans(tokenizers["B"], "😀x")
    assert spans_of(b) == [(0, 0), (0, 0), (0, 0), (0, 4), (4, 5)]
    alignment = align(b, b)
    assert alignment.boundaries == (4, 5)
    assert chunks_of(alignment) == [(0, 4, (0, 4), (0, 4)), (4, 5, (4, 5), (4, 5))]
    assert alignment.exact == (ExactMatch(4, 4, True, True),)


def test_bos_on_one_side_only_shifts_no_chunk(tokenizers):
    w, b = byte_spans(tokenizers["W"], "the cat dog"), byte_spans(tokenizers["B"], "the cat dog")
    assert w.special[0] and not any(b.special)
    alignment = align(w, b)
    assert alignment.boundaries == (3, 7, 11)
    assert chunks_of(alignment) == [(0, 3, (1, 2), (0, 1)), (3, 7, (2, 3), (1, 2)), (7, 11, (3, 4), (2, 3))]
    assert [(m.a_index, m.b_index) for m in alignment.exact] == [(1, 0), (2, 1), (3, 2)]
    assert chunks_of(align(b, w)) == [(0, 3, (0, 1), (1, 2)), (3, 7, (1, 2), (2, 3)), (7, 11, (2, 3), (3, 4))]


def test_eos_on_both_sides_is_special_with_an_empty_span_at_the_text_end(tokenizers):
    w, b = byte_spans(tokenizers["W_eos"], "the cat"), byte_spans(tokenizers["B_eos"], "the cat")
    assert spans_of(w) == [(0, 0), (0, 3), (4, 7), (7, 7)] and w.special == (True, False, False, True)
    assert spans_of(b) == [(0, 3), (3, 7), (7, 7)] and b.special == (False, False, True)
    alignment = align(w, b)
    assert alignment.boundaries == (3, 7)
    assert chunks_of(alignment) == [(0, 3, (1, 2), (0, 1)), (3, 7, (2, 3), (1, 2))]


def test_bpe_split_word_is_one_chunk_of_one_against_n_tokens(tokenizers):
    w, b = byte_spans(tokenizers["W"], "the cats"), byte_spans(tokenizers["B"], "the cats")
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == ["the", "Ġcat", "s"]
    assert spans_of(b) == [(0, 3), (3, 7), (7, 8)]
    assert tokenizers["W"].convert_ids_to_tokens(list(w.ids)) == ["<s>", "the", "cats"]
    alignment = align(w, b)
    assert alignment.boundaries == (3, 8)
    assert chunks_of(alignment) == [(0, 3, (1, 2), (0, 1)), (3, 8, (2, 3), (1, 3))]
    assert [(m.a_index, m.b_index) for m in alignment.exact] == [(1, 0)]


def test_numbers_split_differently_share_only_the_boundaries_both_have(tokenizers):
    b, m = byte_spans(tokenizers["B"], "12345"), byte_spans(tokenizers["M"], "12345")
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == ["12", "345"]
    assert spans_of(b) == [(0, 2), (2, 5)]
    assert tokenizers["M"].convert_ids_to_tokens(list(m.ids)) == ["▁", "12", "3", "4", "5"]
    assert spans_of(m) == [(0, 0), (0, 2), (2, 3), (3, 4), (4, 5)]  # the "▁" prefix covers no text byte
    alignment = align(b, m)
    assert alignment.boundaries == (2, 5)
    assert chunks_of(alignment) == [(0, 2, (0, 1), (0, 2)), (2, 5, (1, 2), (2, 5))]
    assert alignment.exact == ()
    w = byte_spans(tokenizers["W"], "12345")  # one <unk> against two BPE pieces
    assert chunks_of(align(w, b)) == [(0, 5, (1, 2), (0, 2))]


def test_whitespace_gaps_attach_to_the_next_token_and_a_trailing_gap_to_the_last(tokenizers):
    text = "the  cat "  # two spaces inside, one at the end: 9 bytes
    w, b, m = (byte_spans(tokenizers[k], text) for k in ("W", "B", "M"))
    assert spans_of(w) == [(0, 0), (0, 3), (5, 8)]  # the word-level tokenizer covers no space
    assert tokenizers["B"].convert_ids_to_tokens(list(b.ids)) == ["the", "Ġ", "Ġcat", "Ġ"]
    assert spans_of(b) == [(0, 3), (3, 4), (4, 8), (8, 9)]
    assert spans_of(m) == [(0, 3), (3, 4), (4, 8), (8, 9)]
    word_bpe = align(w, b)
    assert word_bpe.boundaries == (3, 9)
    assert chunks_of(word_bpe) == [(0, 3, (1, 2), (0, 1)), (3, 9, (2, 3), (1, 4))]
    bpe_metaspace = align(b, m)
    assert bpe_metaspace.boundaries == (3, 4, 8, 9)
    assert [c.end - c.start for c in bpe_metaspace.chunks] == [3, 1, 4, 1]
    # same spans and same pieces everywhere: a Metaspace decoder strips '▁' from a token decoded alone ('▁cat' →
    # 'cat'), but the piece is what the token stands for in text (' cat'), as byte-level BPE's 'Ġcat'
    assert tokenizers["M"].convert_ids_to_tokens(list(m.ids)) == ["▁the", "▁", "▁cat", "▁"]  # '▁the' at the start: "the"
    assert m.pieces == (b"the", b" ", b" cat", b" ") == b.pieces
    assert bpe_metaspace.exact == (ExactMatch(0, 0, True, True), ExactMatch(1, 1, True, True),
                                   ExactMatch(2, 2, True, True), ExactMatch(3, 3, True, True))


@pytest.mark.parametrize("name", ["W", "B", "M"])
def test_identical_tokenizers_make_every_token_an_exact_match(tokenizers, name):
    text = "the cat 12 dog the"
    spans = byte_spans(tokenizers[name], text)
    alignment = align(spans, spans)
    text_tokens = [i for i in range(len(spans)) if not spans.special[i]]
    assert [(m.a_index, m.b_index) for m in alignment.exact] == [(i, i) for i in text_tokens]
    assert all(m.same_span and m.same_piece for m in alignment.exact)
    assert len(alignment.chunks) == len(text_tokens)


def test_empty_text_has_no_boundaries_and_no_chunks(tokenizers):
    w, b = byte_spans(tokenizers["W"], ""), byte_spans(tokenizers["B"], "")
    assert spans_of(w) == [(0, 0)] and w.special == (True,)
    assert len(b) == 0
    alignment = align(w, b)
    assert alignment.boundaries == () and alignment.chunks == () and alignment.exact == ()


def test_a_side_covering_no_byte_gives_no_chunks(tokenizers):
    w, b = byte_spans(tokenizers["W"], "  "), byte_spans(tokenizers["B"], "  ")
    assert spans_of(w) == [(0, 0)]  # only BOS: the word-level tokenizer drops spaces
    assert spans_of(b) == [(0, 1), (1, 2)]  # "Ġ", "Ġ": no merge for two spaces
    alignment = align(w, b)
    assert alignment.boundaries == () and alignment.chunks == () and alignment.exact == ()


class SlowCharTokenizer(PythonBackend):
    """A real slow (pure-Python) HF tokenizer, one token per lower-case letter or space: it has no offsets."""

    def __init__(self, **kwargs):
        self.vocab = {ch: i for i, ch in enumerate(["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"])}
        super().__init__(unk_token="<unk>", **kwargs)

    def get_vocab(self):
        return dict(self.vocab)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return list(self.vocab)[index]


def test_a_tokenizer_without_offsets_is_refused_in_one_line(tokenizers):
    slow = SlowCharTokenizer()
    assert slow("the cat")["input_ids"] == [21, 9, 6, 1, 4, 2, 21]  # it works, but gives no offsets
    raw = Tokenizer.from_str(tokenizers["B"].backend_tokenizer.to_str())  # a tokenizers.Tokenizer, not HF fast
    for tokenizer, name in ((slow, "SlowCharTokenizer"), (raw, "Tokenizer")):
        with pytest.raises(ValueError, match=rf"^byte_spans needs a fast tokenizer .*got {name}: .*use_fast=True\)$"):
            byte_spans(tokenizer, "the cat")


def test_different_texts_are_refused(tokenizers):
    with pytest.raises(ValueError, match="texts differ"):
        align(byte_spans(tokenizers["B"], "the cat"), byte_spans(tokenizers["B"], "the dog"))


def _true_bpe_byte_spans(tokenizer, spans) -> list[tuple[int, int]]:
    """Reference from the definition: the bytes each byte-level token really holds, both ends moved down to the
    nearest character start (a character belongs to the token holding its last byte)."""
    byte_of = {ch: byte for byte, ch in bytes_to_unicode().items()}
    char_starts = sorted({len(spans.text[:i].encode("utf-8")) for i in range(len(spans.text) + 1)})
    floor = lambda position: max(s for s in char_starts if s <= position)  # noqa: E731
    out, position = [], 0
    for token, special in zip(tokenizer.convert_ids_to_tokens(list(spans.ids)), spans.special):
        length = 0 if special else len(bytes(byte_of[ch] for ch in token))
        out.append((floor(position), floor(position + length)))
        position += length
    assert position == spans.n_bytes
    return out


PIECES = ["the", "cat", "dog", "s", " ", " ", "  ", "12", "345", "5", "é", "€", "日本", "😀", ",", "x"]


@pytest.mark.parametrize("pair", [("W", "B"), ("B", "M"), ("W", "M"), ("B_eos", "W_eos")])
def test_random_texts_chunks_tile_the_text_on_both_sides(tokenizers, pair):
    rng = random.Random(16)
    for _ in range(30):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        a, b = byte_spans(tokenizers[pair[0]], text), byte_spans(tokenizers[pair[1]], text)
        n = len(text.encode("utf-8"))
        for side in (a, b):
            assert all(0 <= s <= e <= n for s, e in spans_of(side))
            assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans_of(side), spans_of(side)[1:]))
        alignment = align(a, b)
        bounds = alignment.boundaries
        assert list(bounds) == sorted(set(bounds)) and all(x > 0 for x in bounds)
        covered = [any(e > s for s, e, sp in zip(x.starts, x.ends, x.special) if not sp) for x in (a, b)]
        # per side: the ends of non-empty text tokens, the last one moved to the text end (trailing gap)
        ends = [sorted({e for s, e, sp in zip(x.starts, x.ends, x.special) if not sp and e > s}) for x in (a, b)]
        cuts = [set(e[:-1]) | {n} for e in ends]
        assert set(bounds) == ((cuts[0] & cuts[1]) if all(covered) else set())
        # chunks tile [0, n) and, on each side, hold every non-special token once, in order
        assert [(c.start, c.end) for c in alignment.chunks] == list(zip([0, *bounds[:-1]], bounds))
        for side, ranges in ((a, [c.a_tokens for c in alignment.chunks]), (b, [c.b_tokens for c in alignment.chunks])):
            listed = [i for r in ranges for i in r]
            assert listed == ([i for i in range(len(side)) if not side.special[i]] if all(covered) else [])
            for chunk, r in zip(alignment.chunks, ranges):
                assert all(chunk.start <= side.starts[i] <= side.ends[i] <= chunk.end for i in r)
        if all(covered):  # the covered bytes of each side: exactly the union of its token spans, inside [0, n)
            union = [set().union(*(range(s, e) for s, e in spans_of(x))) for x in (a, b)]
            chunked = set().union(*(range(c.start, c.end) for c in alignment.chunks))
            assert chunked == set(range(n)) and union[0] <= chunked and union[1] <= chunked
        for name, side in zip(pair, (a, b)):
            if name.startswith("B"):  # byte-level: every byte covered; spans = the true bytes, floored to characters
                assert spans_of(side) == _true_bpe_byte_spans(tokenizers[name], side)
                assert b"".join(text.encode("utf-8")[s:e] for s, e in spans_of(side)) == text.encode("utf-8")


def test_pieces_are_what_tokens_stand_for_in_text_not_their_lone_decode(tokenizers):
    """A SentencePiece decoder strips the space of a word-initial token decoded alone, and a lone byte of a
    multi-byte character decodes to U+FFFD: pieces (and the vocabulary map GOLD's bins use) take the token's own
    bytes, so '▁cat' maps to 'Ġcat' and every byte token to the same byte, never 128 bytes onto one U+FFFD."""
    from potstill.crosstok.alignment import piece_bytes
    from potstill.crosstok.targets import vocab_map

    b, m = tokenizers["B"], tokenizers["M"]
    m_ids = m.convert_tokens_to_ids(["▁the", "▁cat", "▁", "t", "<unk>"])
    assert piece_bytes(m, m_ids) == [b" the", b" cat", b" ", b"t", b"<unk>"]
    high = [b.convert_tokens_to_ids(bytes_to_unicode()[x]) for x in (0xC3, 0xA9, 0xFF)]
    assert piece_bytes(b, high) == [b"\xc3", b"\xa9", b"\xff"]
    mapping = vocab_map(m, b, len(m), len(b))
    # B has 'the' but no 'Ġthe': no single B id stands for ' the'; the lone decode would have mapped it to 'the'
    assert mapping[m_ids[:4]].tolist() == [-1, *b.convert_tokens_to_ids(["Ġcat", "Ġ", "t"])]
    self_map = vocab_map(b, b, len(b), len(b))
    assert self_map.tolist() == list(range(len(b)))  # every byte token maps to itself, high bytes included
    # xproj's projection encodes a piece as text: a lone byte of a multi-byte character has none, so it maps nowhere
    from potstill.crosstok.projection import projection_maps

    assert (projection_maps(b, b, len(b), len(b))[:, high] == -1).all()
