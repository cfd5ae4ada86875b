"""The evaluation suite's pure parts: the evaluate: spec, dataset parsers (malformed files name
the file and record), batched left-padded generation, likelihood ranking, scoring and baselines,
and the comparison table."""

from __future__ import annotations

import base64
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_recipes import TRAINING
from test_specs import only_problem, write

from vlmflow.components.evaluate import datasets, scoring
from vlmflow.components.evaluate.compare import compare, markdown
from vlmflow.components.evaluate.datasets import Item
from vlmflow.components.evaluate.generate import Decoding, answer_logprobs, generate, left_pad
from vlmflow.components.evaluate.metrics import retrieval_recall, retrieval_recall_matrix
from vlmflow.components.train.evaluate import greedy
from vlmflow.errors import UserError
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs import load_recipe

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|user|>": 6, "<|assistant|>": 7}


def png(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- the spec


def test_evaluate_section_loads_with_defaults(tmp_path):
    text = TRAINING.replace("data: dedup", "data: ingest") + "evaluate:\n  - {kind: vqa, name: v}\n"
    task = load_recipe(write(tmp_path, text.replace("dedup", "ingest"))).evaluate[0]
    assert task.data.kind == "held-out" and task.data.split == "test" and task.generation.strategy == "greedy"


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("{kind: vqa, name: v, model: nope}", "evaluate.0.model", "'nope' is not a training stage"),
        ("{kind: vqa, name: v, data: {kind: held-out, artifact: instruct}}", "evaluate.0.data.artifact",
         "unknown data artifact 'instruct'"),
        ("{kind: retrieval, name: r}", "evaluate.0.kind", "retrieval ranks embeddings: it needs model.text"),
        ("{kind: zero-shot-classification, name: z, templates: [a photo]}", "evaluate.0.templates",
         "must hold exactly one {}"),
        ("{kind: captioning, name: c, generation: {strategy: top-k}}", "evaluate.0.generation.strategy", "Input"),
    ],
)  # fmt: skip
def test_evaluate_problems_are_located(tmp_path, entry, field, message):
    text = TRAINING + f"evaluate:\n  - {entry}\n"
    problem = only_problem(write(tmp_path, text))
    assert problem.field.startswith(field) and message in problem.message
    assert problem.line == len(text.splitlines())


# ------------------------------------------------------------------------------ dataset parsers


def test_coco_captions_parse_quarantine_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"},
                   {"id": 3, "file_name": "bad.png"}, {"id": 4, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "caption": "a red square."}, {"image_id": 1, "caption": "red."},
                        {"image_id": 2, "caption": "x"}, {"image_id": 3, "caption": "y"}],
    }  # fmt: skip
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(good))
    loaded = datasets.coco_captions(path, tmp_path, limit=10)
    assert [(i.id, i.references) for i in loaded.items] == [("1", ("a red square.", "red."))]
    reasons = {q["id"]: q["reason"] for q in loaded.quarantine}
    assert reasons == {"2": "missing-image-file", "3": "unreadable-image", "4": "no-caption"}
    good["annotations"][2] = {"image_id": 2}
    path.write_text(json.dumps(good))
    with pytest.raises(UserError, match=r"captions.json: annotations\[2\]: field 'caption' is missing"):
        datasets.coco_captions(path, tmp_path, 10)
    path.write_text('{"images": [1,')
    with pytest.raises(UserError, match=r"captions.json:1:\d+: not valid JSON"):
        datasets.coco_captions(path, tmp_path, 10)


def test_vqav2_parse(tmp_path):
    (tmp_path / "img_7.png").write_bytes(png())
    questions = {"questions": [{"question_id": 70, "image_id": 7, "question": "What color?"},
                               {"question_id": 71, "image_id": 8, "question": "Where?"},
                               {"question_id": 72, "image_id": 7, "question": "Why?"}]}  # fmt: skip
    answers = {"annotations": [{"question_id": 70, "answers": [{"answer": "red"}] * 10},
                               {"question_id": 71, "answers": [{"answer": "home"}]}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    loaded = datasets.vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, "img_{image_id}.png", 10)
    assert [(i.id, i.question, len(i.references)) for i in loaded.items] == [("70", "What color?", 10)]
    assert {q["id"]: q["reason"] for q in loaded.quarantine} == {"71": "missing-image-file", "72": "no-answers"}
    answers["annotations"][1]["answers"] = [{"text": "home"}]
    (tmp_path / "a.json").write_text(json.dumps(answers))
    with pytest.raises(UserError, match=r"a.json: annotations\[1\].answers\[0\]: field 'answer' is missing"):
        datasets.vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, "img_{image_id}.png", 10)


def test_a_repeated_image_or_question_id_is_an_error_not_a_lost_item(tmp_path):
    """A second record under an id would have replaced the first: two in, one out, none quarantined."""
    (tmp_path / "a.png").write_bytes(png())
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}, {"id": 1, "file_name": "a.png"}]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": []}))
    with pytest.raises(UserError, match=r"c.json: images\[2\]: id 1 is used by an earlier record"):
        datasets.coco_captions(tmp_path / "c.json", tmp_path, 10)
    (tmp_path / "q.json").write_text(json.dumps({"questions": []}))
    answers = [{"question_id": 5, "answers": ["yes"]}, {"question_id": 5, "answers": ["no"]}]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": answers}))
    with pytest.raises(UserError, match=r"a.json: annotations\[1\]: id 5 is used by an earlier record"):
        datasets.vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, "{image_id}", 10)


def test_image_folder_classes_round_robin(tmp_path):
    for name, count in (("cat", 3), ("dog", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.png").write_bytes(png())
    (tmp_path / "dog" / "notes.txt").write_text("x")
    loaded, classes = datasets.image_folder(tmp_path, limit=3)
    assert classes == ["cat", "dog"]
    assert [i.id for i in loaded.items] == ["cat/0.png", "dog/0.png", "cat/1.png"] and not loaded.quarantine
    loaded, _ = datasets.image_folder(tmp_path, limit=10)
    assert len(loaded.items) == 4
    assert loaded.quarantine == [{"id": "dog/notes.txt", "source": str(tmp_path / "dog" / "notes.txt"),
                                  "reason": "not-an-image-file"}]  # fmt: skip


def test_choice_jsonl_parse_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = [
        {"id": "q1", "image": "a.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A"},
        {"id": "q2", "image": "b.png", "question": "Shape?", "options": {"A": "x", "B": "y"}, "answer": "B"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    loaded = datasets.choice_jsonl(path, tmp_path, 10)
    assert loaded.items[0].options == (("A", "red"), ("B", "blue")) and loaded.items[0].references == ("A",)
    assert loaded.quarantine[0]["reason"] == "missing-image-file"
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "answer": "C"}) + "\n")
    with pytest.raises(UserError, match=r"mc.jsonl: line 2: answer 'C' is not an option key \(A, B\)"):
        datasets.choice_jsonl(path, tmp_path, 10)
    path.write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=r"mc.jsonl:2:2: not valid JSON"):
        datasets.choice_jsonl(path, tmp_path, 10)


def test_mmbench_tsv_parse_hint_quarantine_and_errors(tmp_path):
    good = base64.b64encode(png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    rows = [
        f"7\tWhich colour?\tLook at the square.\tred\tblue\tgreen\t\tA\tcolour\t{good}",
        f"8\tWhich shape?\tnan\tcircle\tsquare\tnan\tnan\tB\tshape\t{good}",
        "9\tBroken?\t\tyes\tno\t\t\tA\tx\tnot-base64!",
    ]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join([header, *rows]) + "\n")
    loaded = datasets.choice_tsv(path, 10)
    first, second = loaded.items
    assert first.id == "7" and first.question == "Look at the square.\nWhich colour?"
    assert first.options == (("A", "red"), ("B", "blue"), ("C", "green")) and first.references == ("A",)
    assert second.question == "Which shape?" and second.options == (("A", "circle"), ("B", "square"))
    assert first.image == png()
    assert loaded.quarantine == [{"id": "9", "source": f"{path}:4", "reason": "unreadable-image"}]
    path.write_text("\n".join([header, rows[0].replace("\tA\tcolour", "\tD\tcolour")]) + "\n")
    with pytest.raises(UserError, match=r"mmbench.tsv: line 2: answer 'D' is not an option key \(A, B, C\)"):
        datasets.choice_tsv(path, 10)
    path.write_text("index\tquestion\tA\tB\n1\tq\tx\ty\n")
    with pytest.raises(UserError, match=r"mmbench.tsv: missing column\(s\) answer, image"):
        datasets.choice_tsv(path, 10)


def test_held_out_multiple_choice_options_hold_the_answer():
    records = [(f"k{i}", b"", {"qa": [{"question": "What color is the circle?", "answer": c}]})
               for i, c in enumerate(["red", "blue", "green", "red", "purple"])]  # fmt: skip
    loaded = datasets.Loaded(limit=10)
    datasets._choices_from_qa(loaded, records, "dedup")
    for item, (_, _, record) in zip(loaded.items, records, strict=True):
        options = dict(item.options)
        assert options[item.references[0]] == record["qa"][0]["answer"]
        assert len(options) == 4 and len(set(options.values())) == 4


def test_held_out_multiple_choice_asks_a_samples_own_choice_items_first():
    own = {"question": "What shape is the red object?", "options": ["square", "circle"], "answer": "B"}
    records = [("k0", b"", {"qa": [{"question": "What color is the circle?", "answer": "red"}], "choices": [own]}),
               ("k1", b"", {"qa": [{"question": "What color is the circle?", "answer": "blue"}]})]  # fmt: skip
    loaded = datasets.Loaded(limit=10)
    datasets._choices_from_qa(loaded, records, "dedup")
    first, second = loaded.items
    assert (first.question, first.options, first.references) == (
        own["question"],
        (("A", "square"), ("B", "circle")),
        ("B",),
    )
    assert second.question == "What color is the circle?" and dict(second.options)[second.references[0]] == "blue"


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def model() -> VLM:
    recipe = load_recipe(REPO_RECIPE)
    torch.manual_seed(0)
    return VLM(recipe.model, Vocab(300, SPECIAL)).eval()


REPO_RECIPE = __import__("test_specs").REPO / "specs" / "recipes" / "shapes-tiny.yaml"


def test_left_pad_right_aligns_rows():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_left_padded_generation_equals_one_at_a_time(model):
    n = model.num_image_tokens
    prompts = [[1, 6, *[4] * n, 30 + i, *range(40, 40 + 2 * i), 7] for i in range(4)]
    pixels = torch.randn(4, 3, 64, 64)
    batched = generate(model, prompts, pixels, eos=2, options=Decoding(max_new_tokens=6))
    assert batched == [greedy(model, p, pixels[i : i + 1], 2, 6) for i, p in enumerate(prompts)]
    beams = generate(model, prompts[:2], pixels[:2], eos=2, options=Decoding("beam", 4, num_beams=3))
    sampled = generate(model, prompts[:2], pixels[:2], eos=2, options=Decoding("sample", 4, seed=3))
    assert sampled == generate(model, prompts[:2], pixels[:2], eos=2, options=Decoding("sample", 4, seed=3))
    assert all(0 < len(row) <= 4 for row in beams + sampled)


def test_generation_never_emits_the_image_placeholder(model):
    head = model.language.lm_head.weight
    saved = head[4].clone()
    with torch.no_grad():
        head[4] = 10 * head.abs().max()  # the <image> row: the argmax everywhere
    try:
        n = model.num_image_tokens
        rows = generate(model, [[1, 6, *[4] * n, 7]] * 2, torch.randn(2, 3, 64, 64), 2, Decoding("beam", 5))
        rows += generate(model, [[1, 6, *[4] * n, 7]], torch.randn(1, 3, 64, 64), 2, Decoding(max_new_tokens=5))
    finally:
        with torch.no_grad():
            head[4] = saved
    assert rows and all(4 not in row for row in rows)


def test_answer_logprobs_batched_equal_single_and_rank_the_likely_answer(model):
    n = model.num_image_tokens
    prompt = [1, 6, *[4] * n, 30, 7]
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model.lm_logits(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), pixels)[0, -1]
    likely, unlikely = int(logits.argmax()), int(logits.argmin())
    answers = [[unlikely], [likely], [likely, 50]]
    batched = answer_logprobs(model, [prompt] * 3, answers, pixels.repeat(3, 1, 1, 1))
    single = [answer_logprobs(model, [prompt], [a], pixels)[0] for a in answers]
    assert np.allclose(batched, single, atol=1e-5)
    assert int(np.argmax(batched[:2])) == 1
    assert batched[1] == pytest.approx(float(torch.log_softmax(logits, -1)[likely]), abs=1e-5)


@pytest.mark.gpu
def test_generation_and_likelihoods_on_cuda_equal_the_cpu(model):
    """The same greedy and beam tokens and likelihoods on the GPU (an evaluation task's `gpus`)."""
    n = model.num_image_tokens
    prompts = [[1, 6, *[4] * n, 30 + i, 7] for i in range(3)]
    pixels = torch.randn(3, 3, 64, 64)
    cpu = [generate(model, prompts, pixels, 2, Decoding(s, 6)) for s in ("greedy", "beam")]
    cpu_logp = answer_logprobs(model, prompts, [[40], [41, 42], [43]], pixels)
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu = [generate(gpu_model, prompts, pixels.cuda(), 2, Decoding(s, 6)) for s in ("greedy", "beam")]
    assert gpu == cpu
    assert np.allclose(answer_logprobs(gpu_model, prompts, [[40], [41, 42], [43]], pixels.cuda()), cpu_logp, atol=1e-3)


def test_a_task_asking_for_gpus_the_cluster_lacks_is_a_clear_error():
    import ray

    from vlmflow.components.evaluate.stage import check_gpus
    from vlmflow.runtime.ray import RayExecutor
    from vlmflow.specs.evaluate import VqaTask

    task = VqaTask(kind="vqa", name="vqa", gpus=1)
    started = []
    executor = RayExecutor(lambda: started.append(ray.init(num_cpus=1, include_dashboard=False, address="local")))
    check_gpus(task.model_copy(update={"gpus": 0}), executor)  # nothing asked, nothing checked, no Ray started
    assert not started and not ray.is_initialized()
    try:
        with pytest.raises(UserError, match=r"evaluate vqa: gpus: 1 per actor, the Ray cluster has 0 GPUs"):
            check_gpus(task, executor)
        assert len(started) == 1  # Ray started through the executor's start-up
    finally:
        ray.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_task_asking_for_gpus_this_machine_lacks_is_a_clear_error_in_process():
    from vlmflow.components.evaluate.stage import check_gpus
    from vlmflow.runtime.executor import LocalExecutor
    from vlmflow.specs.evaluate import VqaTask

    task = VqaTask(kind="vqa", name="vqa", gpus=1)
    check_gpus(task.model_copy(update={"gpus": 0}), LocalExecutor())
    with pytest.raises(UserError, match=r"evaluate vqa: gpus: 1 per actor, this machine has 0 GPUs"):
        check_gpus(task, LocalExecutor())


# ------------------------------------------------------------------------------ scoring


def item(id_: str, refs: tuple[str, ...], question: str = "", options: tuple = ()) -> Item:
    return Item(id_, b"", refs, question, options)


def test_retrieval_matrix_equals_owner_form_and_credits_identical_captions():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(4, 6))
    owners = [[0, 1], [2], [3, 4], [5]]
    positive = np.zeros((4, 6), dtype=bool)
    for i, texts in enumerate(owners):
        positive[i, texts] = True
    assert retrieval_recall_matrix(sim, positive) == retrieval_recall(sim, owners)
    items = [item("a", ("red.",)), item("b", ("red.",)), item("c", ("blue.",))]
    texts, positive = scoring.retrieval_texts(items)
    assert texts == ["red.", "blue."] and positive.tolist() == [[True, False], [True, False], [False, True]]
    metrics, _ = scoring.retrieval(items, np.array([[1.0, 0.0], [0.9, 0.0], [0.0, 1.0]]), [1])
    assert metrics["i2t_r1"] == 1.0 and metrics["t2i_r1"] == 1.0
    assert metrics["i2t_r1_chance"] == pytest.approx(0.5) and metrics["t2i_r1_chance"] == pytest.approx(0.5)


def test_chance_recall_by_hand():
    positive = np.zeros((1, 10), dtype=bool)
    positive[0, :2] = True
    assert scoring.chance_recall(positive, 1) == pytest.approx(0.2)
    assert scoring.chance_recall(positive, 5) == pytest.approx(1 - (8 * 7 * 6 * 5 * 4) / (10 * 9 * 8 * 7 * 6))


def test_vqa_single_answers_use_exact_match_and_baseline_is_the_majority():
    items = [
        item("1", ("red",), "What color?"),
        item("2", ("red",), "What color?"),
        item("3", ("blue",), "What color?"),
    ]
    metrics, rows = scoring.vqa(items, ["Red.", "blue", "blue"])
    assert metrics["vqa_accuracy"] == pytest.approx(2 / 3) and metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["vqa_accuracy_baseline"] == pytest.approx(2 / 3)  # "red" for every "What color?"
    ten = ("two",) * 3 + ("2",) * 7
    assert scoring.vqa_score("2", ten) == 1.0 and scoring.vqa_score("two", ten) == 1.0
    assert rows[0]["accuracy"] == 1.0


def test_multiple_choice_accuracy_and_extraction_failures():
    opts = (("A", "red"), ("B", "blue"), ("C", "green"))
    items = [item(str(i), ("B",), "Colour?", opts) for i in range(4)]
    metrics, rows = scoring.multiple_choice(items, ["B", "The answer is (A).", "blue", "no idea"])
    assert metrics["accuracy"] == 0.5 and metrics["extraction_failure_rate"] == 0.25
    assert metrics["accuracy_chance"] == pytest.approx(1 / 3) and rows[3]["extracted"] is None


def test_classification_baselines():
    items = [item(str(i), (label,)) for i, label in enumerate(["cat", "cat", "cat", "dog"])]
    scores = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=float)
    metrics, rows = scoring.classification(items, ["cat", "dog"], scores)
    assert metrics["top1"] == 0.75 and metrics["top1_chance"] == 0.5 and metrics["top1_majority"] == 0.75
    assert [r["prediction"] for r in rows] == ["cat", "dog", "cat", "dog"]
    assert set(metrics) == {"top1", "top1_chance", "top1_majority", "items"}  # top-2 of two classes is always 1


def test_captioning_baseline_is_the_most_common_reference():
    items = [item("1", ("a red circle.",)), item("2", ("a red circle.",)), item("3", ("a blue square.",))]
    metrics, rows = scoring.captioning(items, ["a red circle.", "a red circle.", "a blue square."])
    assert metrics["bleu1"] == pytest.approx(1.0) and metrics["cider"] > metrics["cider_baseline"]
    assert {r["id"] for r in rows} == {"1", "2", "3"}


# ----------------------------------------------------------------------------- comparison


def test_compare_reads_metrics_json_and_headline_metrics(tmp_path):
    stage = tmp_path / "artifacts" / "eval-vqa" / "d1"
    stage.mkdir(parents=True)
    (stage / "metrics.json").write_text(json.dumps({"exact_match": 0.5, "exact_match_baseline": 0.25}))
    for run_id, entry in (
        ("r1", {"artifact_path": str(stage)}),
        ("r2", {"artifact_path": str(tmp_path / "gone"), "metrics": {"eval_exact_match": 0.75}}),
    ):
        folder = tmp_path / "runs" / run_id
        folder.mkdir(parents=True)
        stages = [{"name": "train-x", "status": "computed"}, {"name": "eval-vqa", "status": "computed", **entry}]
        (folder / "summary.json").write_text(json.dumps({"run_id": run_id, "stages": stages}))
    table = compare(["r1", str(tmp_path / "runs" / "r2")], tmp_path)
    assert table.columns == ["task", "metric", "r1", "r2"]
    assert table.rows() == [("vqa", "exact_match", 0.5, 0.75), ("vqa", "exact_match_baseline", 0.25, None)]
    assert markdown(table).splitlines()[2] == "| vqa | exact_match | 0.5 | 0.75 |"
    with pytest.raises(UserError, match=r"no run .r3. in .*: give a vlmflow run id"):
        compare(["r3"], tmp_path)
