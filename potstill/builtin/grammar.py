"""A seeded hidden-Markov source of English-like documents whose true next-word probabilities are known exactly.

Hidden states play grammatical roles (determiner, adjective, singular/plural noun, verb, preposition, ...);
subject-verb number agreement is carried by separate singular/plural states, also across a prepositional
phrase ("the cat near the trees sleeps"). Each state also carries a *phase* = how many sentences are done
(capped), so that the end-of-document hazard after each "." depends on the document length so far. That
keeps documents mostly 30-120 words while the probability of ending (EOS) stays part of one exact HMM.

Only ``Generator.random`` (uniform doubles) is drawn, whose stream numpy keeps stable across versions and
machines, so a seed gives the same language and the same documents everywhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from potstill.builtin import lexicon as L

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = {"train": 20_000, "validation": 500, "test": 500}
# P(document ends | a "." just closed sentence k+1); the last entry applies to every later sentence.
END_HAZARD = (0.0, 0.0, 0.0, 0.15, 0.3, 0.45, 0.6)
_GRAMMAR_STREAM = 0  # spawn-key prefix; other built-in tasks use other prefixes
_CHUNK_DOCS = 1000  # docs per independent RNG stream, so a smaller n gives a prefix of the larger set


def split_seed_sequence(seed: int, split: str, stream: int, chunk: int = 0) -> np.random.SeedSequence:
    """An independent, reproducible seed sequence per (seed, stream, split, chunk)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.SeedSequence(entropy=seed, spawn_key=(stream, SPLITS.index(split), chunk))


def _cdf_table(probs: np.ndarray) -> np.ndarray:
    """Row-wise CDFs (R, C) flattened with row r shifted by +r, so one searchsorted samples every row."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0  # exact top so a uniform in [0, 1) never falls past the row
    return (cdf + np.arange(len(probs))[:, None]).ravel()


def _sample_rows(flat_cdf: np.ndarray, n_cols: int, rows: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Column index drawn from each given row of a `_cdf_table` (inverse-CDF sampling), shape like `rows`."""
    return np.searchsorted(flat_cdf, rows + uniforms, side="right") - rows * n_cols


def _normalised_rows(matrix: np.ndarray, name: str) -> np.ndarray:
    if np.any(matrix < 0) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} must be finite and non-negative")
    sums = matrix.sum(axis=-1, keepdims=True)
    if np.any(np.abs(sums - 1.0) > 1e-9):
        raise ValueError(f"every row of {name} must sum to 1 (got sums from {sums.min():.6g} to {sums.max():.6g})")
    return matrix / sums


@dataclass(frozen=True, eq=False)
class HiddenMarkovSource:
    """An HMM over words with an explicit end of document.

    words: V emitted words. start: (S,) initial state distribution. trans: (S, S+1), row s = next state,
    last column = the document ends after a word emitted from s. emit: (S, V) word distribution per state.
    """

    words: list[str]
    start: np.ndarray
    trans: np.ndarray
    emit: np.ndarray
    state_names: list[str] | None = None
    word_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        start = np.asarray(self.start, dtype=np.float64)
        trans = np.asarray(self.trans, dtype=np.float64)
        emit = np.asarray(self.emit, dtype=np.float64)
        n_states, n_words = len(start), len(self.words)
        if start.ndim != 1 or trans.shape != (n_states, n_states + 1) or emit.shape != (n_states, n_words):
            raise ValueError(
                f"shapes must be start (S,), trans (S, S+1), emit (S, V); got start {start.shape}, "
                f"trans {trans.shape}, emit {emit.shape} with V={n_words} words")
        if len(set(self.words)) != n_words:
            raise ValueError("words must be distinct")
        for name, matrix in (("start", start), ("trans", trans), ("emit", emit)):
            normalised = _normalised_rows(matrix, name)  # row-wise over the last axis, so (S,) works too
            normalised.flags.writeable = False  # sources are cached and shared: keep them frozen for real
            object.__setattr__(self, name, normalised)
        object.__setattr__(self, "word_index", {word: i for i, word in enumerate(self.words)})

    @property
    def n_states(self) -> int:
        return len(self.start)

    @classmethod
    def from_seed(cls, seed: int = 0) -> HiddenMarkovSource:
        """The built-in English-like grammar; the seed draws its transition and emission probabilities."""
        return _built_in_source(seed)

    # ---- sampling ---------------------------------------------------------------------------------------
    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _cdf_table(self.start[None]), _cdf_table(self.trans), _cdf_table(self.emit)

    def sample_word_ids(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        """n documents as arrays of word ids (EOS not included); all chains advance together (vectorised)."""
        start_cdf, trans_cdf, emit_cdf = self._tables
        n_states, n_words = self.n_states, len(self.words)
        state = _sample_rows(start_cdf, n_states, np.zeros(n, dtype=np.int64), rng.random(n))
        alive = np.arange(n)
        steps: list[tuple[np.ndarray, np.ndarray]] = []  # per position: (doc indices still going, word ids)
        while alive.size:
            steps.append((alive, _sample_rows(emit_cdf, n_words, state, rng.random(alive.size))))
            nxt = _sample_rows(trans_cdf, n_states + 1, state, rng.random(alive.size))
            going = nxt < n_states  # column S = end of document
            alive, state = alive[going], nxt[going]
        ids = np.full((n, len(steps)), -1, dtype=np.int64)
        for position, (docs, word_ids) in enumerate(steps):
            ids[docs, position] = word_ids
        lengths = (ids >= 0).sum(axis=1)
        return [ids[i, : lengths[i]] for i in range(n)]

    def sample_documents(self, rng: np.random.Generator, n: int) -> list[list[str]]:
        vocab = self.words
        return [[vocab[i] for i in doc.tolist()] for doc in self.sample_word_ids(rng, n)]

    def sample_document(self, rng: np.random.Generator) -> list[str]:
        """One document as a list of words (without the EOS marker)."""
        return self.sample_documents(rng, 1)[0]

    # ---- exact probabilities ----------------------------------------------------------------------------
    def _word_ids(self, words: list[str]) -> np.ndarray:
        unknown = [w for w in words if w not in self.word_index]
        if unknown:
            raise ValueError(f"words not in this source's vocabulary: {sorted(set(unknown))[:10]}")
        return np.array([self.word_index[w] for w in words], dtype=np.int64)

    def _forward(self, word_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scaled forward pass. Returns, for each prefix length i = 0..T:
        next_state (T+1, S) = P(the next word comes from state s | words[:i]) (rows sum to 1 - end);
        end (T+1,) = P(EOS next | words[:i]); word_prob (T,) = P(words[i] | words[:i]) (the scale factors)."""
        n_states, length = self.n_states, len(word_ids)
        next_state = np.zeros((length + 1, n_states))
        end = np.zeros(length + 1)
        word_prob = np.zeros(length)
        next_state[0] = self.start
        for i, word in enumerate(word_ids):
            joint = next_state[i] * self.emit[:, word]  # (S,) P(state, word | prefix)
            word_prob[i] = joint.sum()
            if word_prob[i] <= 0.0:
                raise ValueError(f"word {i} ({self.words[word]!r}) is impossible after the words before it")
            filtered = joint / word_prob[i]  # P(state of word i | words[:i+1])
            step = filtered @ self.trans  # (S+1,)
            next_state[i + 1], end[i + 1] = step[:n_states], step[n_states]
        return next_state, end, word_prob

    def next_word_logprobs(self, words: list[str]) -> np.ndarray:
        """(len(words)+1, V+1) float64: row i = exact log P(next word | words[:i]) over [*self.words, EOS]."""
        next_state, end, _ = self._forward(self._word_ids(words))
        probs = np.concatenate([next_state @ self.emit, end[:, None]], axis=1)
        probs /= probs.sum(axis=1, keepdims=True)  # already 1 up to rounding; make it exact to ~1e-16
        with np.errstate(divide="ignore"):
            return np.log(probs)

    def log_likelihood(self, words: list[str]) -> float:
        """Exact log P(document = words, then EOS)."""
        _, end, word_prob = self._forward(self._word_ids(words))
        if end[-1] <= 0.0:
            raise ValueError("the document cannot end after its last word")
        return float(np.log(word_prob).sum() + np.log(end[-1]))

    def mean_true_nll(self, docs: list[list[str]] | list[str]) -> float:
        """Average true negative log-likelihood per token (words + one EOS per doc), in nats: the floor no
        model can beat on these docs. Strings are split on whitespace."""
        if not docs:
            raise ValueError("mean_true_nll needs at least one document")
        word_lists = [doc.split() if isinstance(doc, str) else list(doc) for doc in docs]
        total_logp = sum(self.log_likelihood(words) for words in word_lists)
        return -total_logp / sum(len(words) + 1 for words in word_lists)


# ---- the built-in grammar ----------------------------------------------------------------------------------
NUMBERS = ("sg", "pl")
_DETERMINERS = {"sg": L.SINGULAR_DETERMINERS, "pl": L.PLURAL_DETERMINERS}
_NOUNS = {"sg": L.SINGULAR_NOUNS, "pl": L.PLURAL_NOUNS}
_TRANSITIVE = {"sg": L.SINGULAR_TRANSITIVE, "pl": L.PLURAL_TRANSITIVE}
_INTRANSITIVE = {"sg": L.SINGULAR_INTRANSITIVE, "pl": L.PLURAL_INTRANSITIVE}
SENTENCE_START = {"subj_det_sg": 2.0, "subj_det_pl": 2.0, "start_adv": 1.0}


def _noun_phrase(prefix: str, number: str, after_noun: dict[str, float]) -> dict[str, tuple[list[str], dict]]:
    """determiner -> (adjective)* -> noun states of one number; `after_noun` = where the phrase leads."""
    det, adj, noun = f"{prefix}_det_{number}", f"{prefix}_adj_{number}", f"{prefix}_noun_{number}"
    return {
        det: (_DETERMINERS[number], {adj: 1.0, noun: 2.0}),
        adj: (L.ADJECTIVES, {noun: 3.0, adj: 0.25}),
        noun: (_NOUNS[number], after_noun),
    }


def grammar_rules() -> dict[str, tuple[list[str], dict[str, float]]]:
    """state -> (words it emits, {successor state: prior weight}). "end" emits "." and starts a new sentence."""
    rules: dict[str, tuple[list[str], dict[str, float]]] = {}
    for n in NUMBERS:  # n = subject number: it must reach the verb, so every state before the verb carries it
        verbs = {f"vt_{n}": 3.0, f"vi_{n}": 3.0, f"pre_adv_{n}": 1.0}
        rules |= _noun_phrase("subj", n, {**verbs, f"subj_prep_{n}": 1.0})
        rules[f"subj_prep_{n}"] = (L.SUBJECT_PREPOSITIONS, {f"spp_{n}_det_{m}": 1.0 for m in NUMBERS})
        for m in NUMBERS:  # m = number of the noun inside the subject's prepositional phrase
            rules |= _noun_phrase(f"spp_{n}", m, verbs)
        rules[f"pre_adv_{n}"] = (L.PRE_VERB_ADVERBS, {f"vt_{n}": 1.0, f"vi_{n}": 1.0})
        rules[f"vt_{n}"] = (_TRANSITIVE[n], {f"obj_det_{m}": 1.0 for m in NUMBERS})
        rules[f"vi_{n}"] = (_INTRANSITIVE[n], {"end": 3.0, "post_adv": 1.0, "vp_prep": 2.0, "comma": 1.0})
        rules |= _noun_phrase("obj", n, {"end": 3.0, "post_adv": 1.0, "vp_prep": 1.0, "comma": 1.0})
        rules |= _noun_phrase("pp", n, {"end": 3.0, "comma": 1.0})
    rules["post_adv"] = (L.POST_VERB_ADVERBS, {"end": 3.0, "vp_prep": 1.0, "comma": 1.0})
    rules["vp_prep"] = (L.VERB_PREPOSITIONS, {f"pp_det_{m}": 1.0 for m in NUMBERS})
    rules["comma"] = ([L.COMMA], {"conj": 1.0})
    rules["conj"] = (L.CONJUNCTIONS, {f"subj_det_{m}": 1.0 for m in NUMBERS})
    rules["start_adv"] = (L.SENTENCE_ADVERBS, {"start_comma": 1.0})
    rules["start_comma"] = ([L.COMMA], {f"subj_det_{m}": 1.0 for m in NUMBERS})
    rules["end"] = ([L.PERIOD], SENTENCE_START)
    return rules


def _zipf_weights(n_words: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf(1) weights over a seeded ranking that mostly keeps the lexicon's order (its first words are common)."""
    ranking_key = np.arange(1, n_words + 1) * np.exp(1.5 * rng.random(n_words))
    ranks = np.argsort(np.argsort(ranking_key, kind="stable"), kind="stable")
    return 1.0 / (ranks + 1.0)


def _jittered(priors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Prior weights times a seeded factor in [0.5, 1.5): sparse (the grammar's zeros stay zero), normalised."""
    weights = priors * (0.5 + rng.random(len(priors)))
    return weights / weights.sum()


@functools.lru_cache(maxsize=8)
def _built_in_source(seed: int) -> HiddenMarkovSource:
    rules = grammar_rules()
    names = list(rules)
    words = L.grammar_vocabulary()
    word_index = {w: i for i, w in enumerate(words)}
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=seed, spawn_key=(_GRAMMAR_STREAM,))))
    n_rules, n_phases = len(names), len(END_HAZARD)
    emit = np.zeros((n_rules, len(words)))  # one phase's blocks; phases share the grammar's probabilities
    trans = np.zeros((n_rules, n_rules))
    for g, name in enumerate(names):
        state_words, successors = rules[name]
        emit[g, [word_index[w] for w in state_words]] = _zipf_weights(len(state_words), rng)
        emit[g] /= emit[g].sum()
        columns = [names.index(s) for s in successors]
        trans[g, columns] = _jittered(np.array(list(successors.values())), rng)
    end_row = names.index("end")
    full_trans = np.zeros((n_phases * n_rules, n_phases * n_rules + 1))
    for phase, hazard in enumerate(END_HAZARD):
        block = slice(phase * n_rules, (phase + 1) * n_rules)
        full_trans[block, block] = trans
        following = min(phase + 1, n_phases - 1) * n_rules  # a "." moves to the next phase's sentence start
        full_trans[phase * n_rules + end_row, block] = 0.0
        full_trans[phase * n_rules + end_row, following: following + n_rules] = (1.0 - hazard) * trans[end_row]
        full_trans[phase * n_rules + end_row, -1] = hazard
    start = np.zeros(n_phases * n_rules)
    start[:n_rules] = trans[end_row]  # a document starts like any sentence, in phase 0
    state_names = [f"{name}@{phase}" for phase in range(n_phases) for name in names]
    return HiddenMarkovSource(words, start, full_trans, np.tile(emit, (n_phases, 1)), state_names)


def builtin_texts(split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Documents (words joined by single spaces, no EOS marker) of one split of the built-in language.

    `seed` picks the language (`HiddenMarkovSource.from_seed(seed)`) and the sampling streams; splits use
    independent streams. Docs come in chunks of 1000 with their own stream, so n=100 is a prefix of n=1000.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = DEFAULT_SPLIT_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    source = HiddenMarkovSource.from_seed(seed)
    vocab = np.array(source.words, dtype=object)
    texts: list[str] = []
    for chunk in range(-(-n // _CHUNK_DOCS)):
        rng = np.random.Generator(np.random.PCG64(split_seed_sequence(seed, split, _GRAMMAR_STREAM, chunk)))
        docs = source.sample_word_ids(rng, _CHUNK_DOCS)[: n - len(texts)]
        texts.extend(" ".join(vocab[doc]) for doc in docs)
    return texts
