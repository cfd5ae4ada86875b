"""Evaluation metrics: hand-computed values, and equality with pycocoevalcap 1.2 on the same inputs (to 1e-6)."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest

from vlmflow.components.evaluate import (
    bleu,
    cider,
    cider_per_image,
    exact_match,
    extract_choice,
    retrieval_recall,
    score_captions,
    tokenize_captions,
    topk_accuracy,
    vqa_accuracy,
)
from vlmflow.components.evaluate.vqa import normalize_vqa_answer, process_punctuation

_VOCAB_TEXT = "a an the man woman dog cat two red blue small large sitting on in with next to of table street bus"
VOCAB = _VOCAB_TEXT.split()
_PIECES_TEXT = (
    "a man woman dog's can't won't it's they're cannot gonna U.S. Mr. etc. e.g. No. Inc. Jan. "
    "well-known 3-year-old 1,000 3.5 12:30 1/2 50% $5 #1 ( ) [ ] { } \" ' ` -- ... … . , ; : ! ? & * / "
    "é ½ £ € ° :) ^_^ A The Then I"
)


def _random_corpus(seed: int, n_images: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Pre-tokenised captions with the edge cases: empty, < 4 tokens, repeats, 1 and 5 references."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))

    candidates, references = {}, {}
    for i in range(n_images):
        key = f"img{i}"
        n_refs = 1 if i % 7 == 0 else (5 if i % 3 else rng.randint(2, 4))
        references[key] = [sentence(1, 14) for _ in range(n_refs)]
        kind = i % 10
        if kind == 0:
            candidates[key] = ""
        elif kind == 1:
            candidates[key] = sentence(1, 3)
        elif kind == 2:
            candidates[key] = " ".join([rng.choice(VOCAB)] * rng.randint(2, 9))
        elif kind == 3:
            candidates[key] = rng.choice(references[key])
        else:
            candidates[key] = sentence(2, 16)
    return candidates, references


# ------------------------------------------------------------------------------ hand-computed captioning values


def test_cider_hand_computed_identical_pair():
    # two images, each candidate equals its single reference: tf-idf weights are all log(2); the 1- and 2-gram
    # cosines are 1, the 3- and 4-gram vectors are empty (0); no length penalty: mean(1, 1, 0, 0) * 10 = 5
    cands = {"x": "a b", "y": "c d"}
    refs = {"x": ["a b"], "y": ["c d"]}
    assert cider(cands, refs, tokenize=False) == pytest.approx(5.0, abs=1e-12)
    assert cider_per_image({"x": "e f", "y": "c d"}, refs, tokenize=False) == pytest.approx({"x": 0.0, "y": 5.0})


def test_cider_single_image_is_zero_and_all_empty_references_rejected():
    assert cider({"x": "a dog"}, {"x": ["a dog"]}, tokenize=False) == 0.0  # idf = log(1) - log(1)
    with pytest.raises(ValueError, match="empty after tokenisation"):
        cider({"x": "a", "y": "b"}, {"x": [""], "y": ["..."]})


def test_bleu_hand_computed_with_reference_smoothing():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> the 1e-15 "tiny" term makes BLEU-4 = (0.25e-15)^(1/4)
    scores = bleu({"x": "a b c e"}, {"x": ["a b c d"]}, tokenize=False)
    assert scores[0] == pytest.approx(0.75, abs=1e-9)
    assert scores[1] == pytest.approx(math.sqrt(0.5), abs=1e-9)
    assert scores[2] == pytest.approx(0.25 ** (1 / 3), abs=1e-9)
    assert scores[3] == pytest.approx((0.25e-15) ** 0.25, rel=1e-6)
    # brevity penalty with the closest reference length (3, not 9): exp(1 - 3/2)
    short = bleu({"x": "a b"}, {"x": ["a b c", "a b c d e f g h i"]}, tokenize=False)
    assert short[0] == pytest.approx(math.exp(1 - 3 / 2), abs=1e-9)


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match="same keys"):
        bleu({"x": "a"}, {"y": ["a"]})
    with pytest.raises(ValueError, match=r"references\['x'\] is empty"):
        cider({"x": "a"}, {"x": []})
    with pytest.raises(TypeError, match="list of strings"):
        cider({"x": "a"}, {"x": "a"})


# ----------------------------------------------------------------------------------- pycocoevalcap equality


@pytest.fixture(scope="module")
def coco():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (dev-only) is not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    return Bleu(4), Cider()


@pytest.mark.parametrize("seed,n_images", [(0, 300), (1, 40), (2, 2)])
def test_scorers_equal_pycocoevalcap_on_pretokenised_captions(coco, seed, n_images):
    bleu_ref, cider_ref = coco
    cands, refs = _random_corpus(seed, n_images)
    res = {key: [cands[key]] for key in cands}
    expected_bleu, expected_bleu_images = bleu_ref.compute_score(refs, res, verbose=0)
    expected_cider, expected_cider_images = cider_ref.compute_score(refs, res)
    scores = score_captions(cands, refs, tokenize=False)
    assert scores.bleu == pytest.approx(expected_bleu, abs=1e-6)
    assert scores.cider == pytest.approx(expected_cider, abs=1e-6)
    assert [scores.cider_per_image[key] for key in cands] == pytest.approx(list(expected_cider_images), abs=1e-6)
    for n in range(4):
        assert [scores.bleu_per_image[key][n] for key in cands] == pytest.approx(expected_bleu_images[n], abs=1e-6)
    assert bleu(cands, refs, tokenize=False) == scores.bleu
    assert cider(cands, refs, tokenize=False) == scores.cider


RAW_CAPTIONS = [
    "A man's red bike, leaning on the U.S. Post Office wall.",
    "Two dogs (a Labrador and a poodle) play -- happily -- in the snow!",
    "\"Don't touch,\" says the sign; it's 5:30 p.m. on Jan. 5th.",
    "A well-known 3-year-old can't reach the $5.00 cake... or can she?",
    "THE CAT SAT ON THE MAT",
    "A woman's hat costs £10 & a ½ price scarf costs €3 (50% off).",
    "Mr. Smith and Dr. Jones visit St. Louis etc.",
    "Some people e.g. tourists walk on 5th Ave. near 10-15 cabs",
    "I'm gonna take a photo of y'all with my cannot-miss camera",
    "A plate of food: rice, beans, and 1,000 grains of salt.",
    "A giraffe 'looking' at the camera… in the zoo",
    "An old-fashioned clock reads 12:30 o'clock",
    "",
    "   ",
    "A sign says http://example.com/foo and john@doe.com :)",
    "[A] {B} <C> 'quoted' `` weird '' ``",
    "Cafe\u0301 naïve Zürich Straße ΣΟΦΟΣ",
    "The bus No. 5 is red. The end",
    "She said: wow!!! really?!",
    "a b. c d. E f. x.y.z. U.S. The end.",
]


def _noisy_captions(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pieces = _PIECES_TEXT.split()
    out = []
    for _ in range(n):
        words = [rng.choice(pieces) for _ in range(rng.randint(0, 12))]
        words = [w.upper() if rng.random() < 0.1 else w for w in words]
        out.append("".join(w + rng.choice([" ", " ", " ", ""]) for w in words) + rng.choice(["", ".", " ."]))
    return out


@pytest.fixture(scope="module")
def java_reference():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (dev-only) is not installed")
    if shutil.which("java") is None:
        pytest.skip("java is not installed: pycocoevalcap's PTBTokenizer runs Stanford CoreNLP on the JVM")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = RAW_CAPTIONS + _noisy_captions(7, 400)
    rng = random.Random(3)
    refs = {f"i{i}": [captions[(i * 5 + j) % len(captions)] for j in range(1 + i % 5)] for i in range(120)}
    cands = {key: rng.choice(captions) for key in refs}
    tokenizer = PTBTokenizer()
    ref_tok = tokenizer.tokenize({key: [{"caption": c} for c in caps] for key, caps in refs.items()})
    cand_tok = tokenizer.tokenize({key: [{"caption": c}] for key, c in cands.items()})
    return cands, refs, cand_tok, ref_tok


def test_tokenize_captions_equals_java_ptbtokenizer(java_reference):
    cands, refs, cand_tok, ref_tok = java_reference
    assert tokenize_captions(refs) == ref_tok
    assert tokenize_captions({key: [c] for key, c in cands.items()}) == cand_tok


def test_bleu_and_cider_end_to_end_equal_coco_pipeline(coco, java_reference):
    bleu_ref, cider_ref = coco
    cands, refs, cand_tok, ref_tok = java_reference
    expected_bleu, _ = bleu_ref.compute_score(ref_tok, cand_tok, verbose=0)
    expected_cider, _ = cider_ref.compute_score(ref_tok, cand_tok)
    scores = score_captions(cands, refs)
    assert scores.bleu == pytest.approx(expected_bleu, abs=1e-6)
    assert scores.cider == pytest.approx(expected_cider, abs=1e-6)


@pytest.mark.parametrize(
    "raw,tokenized",
    [
        ("A man's dog can't run.", "a man 's dog ca n't run"),
        ("They cannot, gonna", "they can not gon na"),
        ("Two (small) dogs [left]", "two -lrb- small -rrb- dogs -lsb- left -rsb-"),
        ('He said "hi" -- and left...', "he said hi and left"),
        ("Mr. Smith in the U.S. Army", "mr. smith in the u.s. army"),
        ("a well-known 3-year-old, 1,000.5 £5 ½", "a well-known 3-year-old 1,000.5 # 5 1/2"),
        ("It's 5 o'clock :)", "it 's 5 o'clock -rrb-"),  # lowercased -RRB- survives the filter
    ],
)
def test_ptb_tokenization_hand_checked(raw, tokenized):
    # tokenised alone (no next caption) and checked against the java reference by hand
    assert tokenize_captions({"k": [raw]}) == {"k": [tokenized]}


def test_abbreviation_at_caption_end_sees_the_next_caption():
    # "etc." before a capitalised caption is a sentence end: "etc." + "." (the "." is then dropped)
    assert tokenize_captions({"k": ["dogs etc.", "A cat"]})["k"] == ["dogs etc.", "a cat"]
    assert tokenize_captions({"k": ["the Co.o was", "Jan.a"]})["k"] == ["the co. o was", "jan.a"]


# --------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_average_over_ten_answers(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_fewer_answers_and_empty():
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)  # each subset has 2 matches
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # the official formula; use exact_match for one answer
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize(
    "raw,normalized",
    [
        ("The Two dogs.", "2 dogs"),
        ("none", "0"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("1,000", "1000"),  # a digit,digit group makes every mark vanish instead of becoming a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes!", "yes"),
        ("red/white", "red white"),
        ("red / white", "red white"),
        ("hot-dog", "hot dog"),
        ("  Yes\n", "yes"),
        ("ten", "10"),
    ],
)
def test_vqa_answer_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_official_quirks():
    assert process_punctuation("a.b." * 20).count(".") == 40 - 32  # re.UNICODE passed as sub()'s count
    assert process_punctuation("x-y") == "x y" and process_punctuation("x - y") == "x  y"
    # identical answers are not normalised at all (the official annotations already are)
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10, normalize_answers=True) == 1.0
    # differing answers get punctuation handling only (no lowercasing, no number words)
    assert vqa_accuracy("yes", ["yes."] * 4 + ["no"] * 6) == 1.0
    # "!" becomes a space and answers are not stripped: "yes " never matches (official behaviour)
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0
    assert vqa_accuracy("2", ["two"] * 4 + ["no"] * 6) == 0.0


def test_exact_match():
    assert exact_match("Two.", "2") == 1.0
    assert exact_match("the red cube", "red cube") == 1.0
    assert exact_match("red", "blue") == 0.0


# ------------------------------------------------------------------------------------- retrieval and top-k


def test_retrieval_recall_hand_computed():
    # 3 images, 2 captions each (texts 0-5)
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: best own caption (0.9) ranks 1
            [0.7, 0.2, 0.1, 0.3, 0.0, 0.0],  # image 1: own texts 2, 3; best own 0.3 has 0.7 above -> rank 2
            [0.1, 0.1, 0.1, 0.1, 0.2, 0.6],  # image 2: rank 1
        ]
    )
    owners = [[0, 1], [2, 3], [4, 5]]
    result = retrieval_recall(sim, owners, ks=(1, 2))
    assert result["i2t_r1"] == pytest.approx(2 / 3) and result["i2t_r2"] == 1.0
    # t2i ranks: t0 1, t1 3 (0.2 above, a 0.1 tie counted against), t2 3 (0.8 above, 0.1 tie), t3 1, t4 1, t5 1
    assert result["t2i_r1"] == pytest.approx(4 / 6) and result["t2i_r2"] == pytest.approx(4 / 6)
    assert result["i2t_median_rank"] == 1.0


def test_retrieval_ties_are_pessimistic_and_inputs_checked():
    result = retrieval_recall(np.zeros((4, 4)), [[0], [1], [2], [3]], ks=(1, 4))
    assert result["i2t_r1"] == 0.0 and result["t2i_r1"] == 0.0 and result["i2t_r4"] == 1.0
    with pytest.raises(ValueError, match="belong to no image"):
        retrieval_recall(np.zeros((2, 3)), [[0], [1]])
    with pytest.raises(ValueError, match="listed under images"):
        retrieval_recall(np.zeros((2, 2)), [[0, 1], [1]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(np.array([[np.nan]]), [[0]])


def test_topk_accuracy_hand_computed_with_ties():
    scores = [[0.1, 0.5, 0.4], [0.3, 0.3, 0.3], [0.9, 0.0, 0.1]]
    # ranks: row 0 -> 1, row 1 -> 3 (a three-way tie counts against), row 2 -> 2
    expected = {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0}
    assert topk_accuracy(scores, [1, 0, 2], ks=(1, 2, 5)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="labels must lie"):
        topk_accuracy(scores, [0, 1, 3])


# --------------------------------------------------------------------------------------- multiple choice

OPTIONS = {"A": "a red cube", "B": "a blue sphere", "C": "dark red", "D": "red"}


@pytest.mark.parametrize(
    "text,choice",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("**D**", "D"),
        ("Answer: C", "C"),
        ("The answer is (A).", "A"),
        ("option d", "D"),
        ("B. a blue sphere", "B"),
        ("b) blue", "B"),
        ("I pick (C) since it is darker", "C"),
        ("A blue sphere.", "B"),
        ("It looks dark red to me", "C"),
        ("it is red", "D"),
        ("A cat", None),
        ("(A) or (B)", None),
        ("", None),
        ("no idea", None),
    ],
)
def test_extract_choice(text, choice):
    assert extract_choice(text, OPTIONS) == choice
