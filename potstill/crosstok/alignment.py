"""Byte-offset alignment of two tokenisations of the same text (the base of cross-tokenizer KD).

`byte_spans(tokenizer, text)` encodes `text` with a fast tokenizer and gives each token its [start, end) span in
UTF-8 bytes of `text`; `align(a, b)` finds the byte positions where both tokenisations end a token (shared
boundaries), the chunks between them (ALM compares chunk likelihoods, GOLD merges token groups) and the chunks that
are one token on each side (exact matches, where ordinary divergences can apply).

Rules (each is tested in tests/test_crosstok_alignment.py):
- Bytes, not characters: character offsets from the tokenizer become UTF-8 byte offsets ("é" is 2 bytes, "€" 3,
  "日" 3, an emoji 4).
- A character split across tokens (byte-level BPE: HF gives every token holding some of its bytes the whole
  character's offsets, so neighbours overlap) belongs to the LAST token holding its bytes: a token's end is cut
  back to the next token's start. A token holding only part of one character gets an empty span and joins the
  chunk of the token that completes the character. Boundaries are therefore always on character boundaries.
- Special tokens the tokenizer inserts (BOS/EOS: special_tokens_mask 1 and no text under them) are flagged
  `special`, get an empty span at their position and are left out of the alignment, so a BOS on one side only
  shifts no chunk. A special token written in the text itself covers its bytes like any other token.
- Whitespace: bytes no token of a side covers (the space a word-level tokenizer drops) are attached to the next
  token of that side; bytes after the last token are attached to the last token. So each side's tokens, taken from
  the previous token's end to their own end, tile the whole text [0, n), and the text end is a shared boundary
  whenever both sides have a non-empty token. Equivalently: boundaries are the token ends on covered bytes.
"""
from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class TokenSpans:
    """One tokenisation of `text`: per token its id, [start, end) in UTF-8 bytes, and its decoded bytes."""
    text: str
    ids: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    special: tuple[bool, ...]  # inserted by the tokenizer and covering no text (BOS/EOS): not aligned
    pieces: tuple[bytes | None, ...]  # what each token stands for on its own (`piece_bytes`; None: unknowable)

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of the text, spelled by tokens a[a_tokens] on one side and b[b_tokens] on the other.

    Token ranges index the full token lists (specials included); specials never fall inside a chunk's range."""
    start: int
    end: int
    a_tokens: range
    b_tokens: range


@dataclass(frozen=True)
class ExactMatch:
    """A chunk of one token on each side. `same_span`: both tokens cover the same bytes (whitespace included);
    `same_piece`: both tokens decode to the same bytes (false e.g. for an UNK against a real word)."""
    a_index: int
    b_index: int
    same_span: bool
    same_piece: bool


@dataclass(frozen=True)
class Alignment:
    boundaries: tuple[int, ...]  # sorted byte positions (> 0) where both sides end a token; last is n_bytes
    chunks: tuple[Chunk, ...]
    exact: tuple[ExactMatch, ...]


def _char_to_byte(text: str) -> list[int]:
    """Byte offset of every character position 0..len(text) (one entry per position, the last = n_bytes)."""
    return [0, *accumulate(len(ch.encode("utf-8")) for ch in text)]


def byte_spans(tokenizer, text: str) -> TokenSpans:
    """Encode `text` (with the tokenizer's own special tokens) and give each token its span in UTF-8 bytes."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"byte_spans needs a fast tokenizer (offsets mapping); got {type(tokenizer).__name__}: "
                         "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, mask = list(enc["input_ids"]), list(enc["offset_mapping"]), list(enc["special_tokens_mask"])
    special = [bool(m) and s == e for m, (s, e) in zip(mask, offsets)]
    to_byte = _char_to_byte(text)
    starts, ends = [0] * len(ids), [0] * len(ids)
    text_tokens = [i for i in range(len(ids)) if not special[i]]
    previous_end = 0  # in characters
    for k, i in enumerate(text_tokens):
        start, end = offsets[i]
        if k + 1 < len(text_tokens):  # a character shared with the next token belongs to the next token
            end = min(end, offsets[text_tokens[k + 1]][0])
        end = max(start, end)
        if start < previous_end:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} gave overlapping offsets {offsets[i]} for token "
                             f"{k} of {text!r}: cannot align it by bytes")
        starts[i], ends[i], previous_end = to_byte[start], to_byte[end], end
    _place_specials(special, starts, ends)
    data = text.encode("utf-8")
    pieces = [_in_place(p, data[a:b]) for p, a, b in zip(piece_bytes(tokenizer, ids), starts, ends)]
    return TokenSpans(text, tuple(ids), tuple(starts), tuple(ends), tuple(special), tuple(pieces))


def _in_place(piece: bytes | None, span: bytes) -> bytes | None:
    """A word-initial piece (' the' from SentencePiece's '▁the') at the start of the text, where the tokenizer
    prepended the marker to a text without a space, stands for the text without it."""
    if piece is not None and piece[:1] == b" " and span[:1] != b" " and piece[1:] == span:
        return span
    return piece


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoder and, for a Sequence, of its parts."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return {decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []))}


def piece_bytes(tokenizer, ids) -> list[bytes | None]:
    """The bytes each id stands for on its own, None where they cannot be known. Decoding an id alone is not
    enough: a SentencePiece decoder strips a word-initial token's space ('▁the' → 'the') and a lone byte of a
    multi-byte character decodes to U+FFFD. So: added tokens as decoded; byte-fallback tokens '<0xHH>' as that
    byte; byte-level BPE tokens through the byte-level alphabet; '▁' as the space it stands for; anything else
    as decoded alone, or None if that gives U+FFFD the token itself does not hold."""
    ids = list(ids)
    decoded = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    if byte_level:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unbyte = {c: b for b, c in bytes_to_unicode().items()}
    added = tokenizer.added_tokens_decoder
    out: list[bytes | None] = []
    for i, text, token in zip(ids, decoded, tokens):
        fallback = BYTE_FALLBACK.fullmatch(token or "")
        if i in added or token is None:
            out.append(text.encode("utf-8"))
        elif fallback:
            out.append(bytes([int(fallback.group(1), 16)]))
        elif byte_level and all(c in unbyte for c in token):
            out.append(bytes(unbyte[c] for c in token))
        elif "\u2581" in token:
            out.append(token.replace("\u2581", " ").encode("utf-8"))
        elif "\ufffd" in text and "\ufffd" not in token:
            out.append(None)
        else:
            out.append(text.encode("utf-8"))
    return out


def _place_specials(special: list[bool], starts: list[int], ends: list[int]) -> None:
    """Give inserted specials an empty span where they sit: at the previous token's end (0 before any token)."""
    position = 0
    for i, is_special in enumerate(special):
        if is_special:
            starts[i] = ends[i] = position
        else:
            position = ends[i]


def _cuts(spans: TokenSpans) -> list[int]:
    """Byte positions after each non-empty text token (the last one moved to the text end: trailing gap)."""
    cuts = [e for s, e, sp in zip(spans.starts, spans.ends, spans.special) if not sp and e > s]
    if cuts:
        cuts[-1] = spans.n_bytes
    return cuts


def _chunk_ranges(spans: TokenSpans, boundaries: list[int]) -> list[range]:
    """Per chunk (between consecutive boundaries) the contiguous range of `spans`' tokens spelling it."""
    if not boundaries:  # one side covers no byte (e.g. only spaces, which a word-level tokenizer drops)
        return []
    members: list[list[int]] = [[] for _ in boundaries]
    pending: list[int] = []  # empty-span tokens wait for the token that completes their character
    text_tokens = [i for i in range(len(spans)) if not spans.special[i]]
    last_nonempty = max((i for i in text_tokens if spans.ends[i] > spans.starts[i]), default=-1)
    for i in text_tokens:
        pending.append(i)
        if spans.ends[i] > spans.starts[i]:
            end = spans.n_bytes if i == last_nonempty else spans.ends[i]
            members[bisect.bisect_left(boundaries, end)].extend(pending)
            pending = []
    members[-1].extend(pending)
    ranges = [range(m[0], m[-1] + 1) if m else range(0) for m in members]
    for r in ranges:
        if any(spans.special[i] for i in r):
            raise ValueError(f"an inserted special token lies inside the text of {spans.text!r}: cannot align it")
    return ranges


def align(a: TokenSpans, b: TokenSpans) -> Alignment:
    """Shared boundaries, chunks and exact matches of two tokenisations of the same text (rules: module doc)."""
    if a.text != b.text:
        raise ValueError("align needs two tokenisations of the same text; the texts differ")
    boundaries = sorted(set(_cuts(a)) & set(_cuts(b)))
    starts = [0, *boundaries[:-1]]
    chunks = tuple(Chunk(s, e, ra, rb) for s, e, ra, rb in
                   zip(starts, boundaries, _chunk_ranges(a, boundaries), _chunk_ranges(b, boundaries)))
    exact = tuple(
        ExactMatch(c.a_tokens[0], c.b_tokens[0],
                   (a.starts[c.a_tokens[0]], a.ends[c.a_tokens[0]]) == (b.starts[c.b_tokens[0]], b.ends[c.b_tokens[0]]),
                   a.pieces[c.a_tokens[0]] is not None and a.pieces[c.a_tokens[0]] == b.pieces[c.b_tokens[0]])
        for c in chunks if len(c.a_tokens) == 1 and len(c.b_tokens) == 1)
    return Alignment(tuple(boundaries), chunks, exact)
