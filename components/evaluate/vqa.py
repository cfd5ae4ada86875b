"""VQAv2 answer normalisation and accuracy, reproducing the official ``vqaEval.py`` (GT-Vision-Lab/VQA).

The official evaluation normalises the *prediction* fully (punctuation, then lowercase,
number words -> digits, articles dropped, contractions restored) but the human answers only
for punctuation, and only when the ten answers are not all identical: the released
annotations are already normalised. Pass ``normalize_answers=True`` for answers that are
not (e.g. your own data with "Two" or "the cat"): they then get the prediction's full
normalisation.

Quirks of the official code kept on purpose: the period regex ``(?!<=\\d)(\\.)(?!\\d)`` (a
mistyped lookbehind: it removes every "." not followed by a digit) is applied with
``count=re.UNICODE``, i.e. to the first 32 periods only; a punctuation mark is deleted
outright (not replaced by a space) when it touches a space anywhere in the text or when the
text contains a digit-comma-digit group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE as sub()'s count argument


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: strip or space out punctuation, drop periods not before a digit."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """The full normalisation the official evaluation applies to a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_answers: bool = False) -> float:
    """VQAv2 soft accuracy of one prediction against the human answers, as the official ``vqaEval.py``.

    For each answer, leave it out and score ``min(#other answers equal to the prediction / 3, 1)``;
    return the mean over the ``len(answers)`` leave-one-out subsets. With the usual 10 answers and
    m of them matching this is 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >=4. It works for any
    number of answers, but the ceiling drops below 1 with fewer than 4 (and is 0 with a single
    answer: use :func:`exact_match` for single-answer sets).

    Args:
        prediction: the model's answer (any casing/punctuation).
        answers: the human answers (VQAv2 has 10 per question).
        normalize_answers: also fully normalise the answers (see the module docstring).

    Returns:
        The accuracy in [0, 1].
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_vqa_answer(prediction)
    if normalize_answers:
        gts = [normalize_vqa_answer(answer) for answer in answers]
    elif len(set(answers)) > 1:
        gts = [process_punctuation(answer) for answer in answers]
    else:
        gts = list(answers)
    matches = [gt == predicted for gt in gts]
    total_matches = sum(matches)
    scores = [min(1.0, float(total_matches - int(matched)) / 3) for matched in matches]
    return float(sum(scores)) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if prediction and answer are equal after the official VQA normalisation (applied to both), else 0.0."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))
