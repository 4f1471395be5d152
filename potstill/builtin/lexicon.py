"""The built-in grammar's word lists: plain English words, written here (no external data, license-clean).

Lists are in a fixed order; the seeded grammar (``grammar.py``) only decides how often each word is used.
Nouns and verbs are written once in their base form; plurals and third-person singular forms are derived by
the regular English rules below, and the base lists avoid irregular words so every derived form is real.
"""
from __future__ import annotations

NOUNS = """
cat dog bird horse cow goat rabbit fox bear lion tiger monkey frog duck owl snake
farmer teacher doctor baker singer painter sailor driver student king queen girl boy friend neighbor pilot
nurse writer artist captain
book box cup table chair lamp door window house garden river road hill tree flower apple cake letter
song story boat car train bell key coin ship ball kite hat coat shoe bottle basket clock candle map city
village field forest lake stone bridge tower island cloud star wall bench bag
""".split()

ADJECTIVES = """
big small old young red blue green yellow happy sad quiet loud tall short bright dark warm cold soft hard
quick slow kind brave clever gentle tired hungry busy lazy proud calm wild tiny huge heavy empty full rich
poor strange famous friendly lucky careful funny curious silent golden silver wooden little sweet fresh
round sharp polite grey purple
""".split()

TRANSITIVE_VERBS = """
see find like love want carry watch follow paint build open close hold bring take make read write sell buy
push pull lift draw fix catch eat visit help call miss chase teach wash throw keep need hear meet remember
""".split()

INTRANSITIVE_VERBS = """
sleep run walk sing dance laugh cry smile wait swim jump rest fall sit stand arrive listen shout talk work
play grow shine travel return hide dream wander whisper
""".split()

SINGULAR_DETERMINERS = "the a this that every each one my your our their his her no another".split()
PLURAL_DETERMINERS = "the these those some many few two three several all my your our their his her no".split()

PRE_VERB_ADVERBS = "often never always rarely sometimes usually still also seldom".split()
POST_VERB_ADVERBS = """
quickly slowly quietly loudly happily sadly carefully together today again outside there here early late
""".split()
SENTENCE_ADVERBS = "then later suddenly meanwhile afterwards yesterday tomorrow finally".split()

SUBJECT_PREPOSITIONS = "with near behind beside from under above by".split()
VERB_PREPOSITIONS = "in on at into under over across through near behind beside along toward around".split()
CONJUNCTIONS = "and but so while because although when".split()

PERIOD = "."
COMMA = ","


def _add_s(word: str) -> str:
    """Regular English -s suffix (noun plural or verb third-person singular)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


SINGULAR_NOUNS = NOUNS
PLURAL_NOUNS = [_add_s(noun) for noun in NOUNS]
# Verb number agreement: a singular subject takes "sees", a plural subject takes "see".
SINGULAR_TRANSITIVE = [_add_s(verb) for verb in TRANSITIVE_VERBS]
PLURAL_TRANSITIVE = TRANSITIVE_VERBS
SINGULAR_INTRANSITIVE = [_add_s(verb) for verb in INTRANSITIVE_VERBS]
PLURAL_INTRANSITIVE = INTRANSITIVE_VERBS


def _ordered_unique(lists: list[list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for words in lists:
        seen.update(dict.fromkeys(words))
    return list(seen)


def grammar_vocabulary() -> list[str]:
    """Every word the grammar can emit, in a fixed order (punctuation first). Independent of any seed."""
    return _ordered_unique([
        [PERIOD, COMMA], SINGULAR_DETERMINERS, PLURAL_DETERMINERS, ADJECTIVES, SINGULAR_NOUNS, PLURAL_NOUNS,
        SINGULAR_TRANSITIVE, PLURAL_TRANSITIVE, SINGULAR_INTRANSITIVE, PLURAL_INTRANSITIVE,
        PRE_VERB_ADVERBS, POST_VERB_ADVERBS, SENTENCE_ADVERBS, SUBJECT_PREPOSITIONS, VERB_PREPOSITIONS,
        CONJUNCTIONS,
    ])


def _check_open_classes_disjoint() -> None:
    """Nouns, verbs and adjectives must not share a spelling, so the role ambiguity is only where we chose it."""
    classes = {
        "noun": SINGULAR_NOUNS + PLURAL_NOUNS, "adjective": ADJECTIVES,
        "transitive verb": SINGULAR_TRANSITIVE + PLURAL_TRANSITIVE,
        "intransitive verb": SINGULAR_INTRANSITIVE + PLURAL_INTRANSITIVE,
    }
    owner: dict[str, str] = {}
    for kind, words in classes.items():
        if len(set(words)) != len(words):
            raise AssertionError(f"duplicate {kind} in the lexicon")
        for word in words:
            if word in owner:
                raise AssertionError(f"{word!r} is both a {owner[word]} and a {kind}")
            owner[word] = kind


_check_open_classes_disjoint()
