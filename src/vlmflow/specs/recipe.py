"""The `Recipe` model: the single source of truth for a vlmflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr

from vlmflow.specs.base import Float, Int, Seed, SpecPath, StrictModel
from vlmflow.specs.capfilt import HF_BLIP, CapfiltSpec, hf_architecture
from vlmflow.specs.data import DataSpec
from vlmflow.specs.evaluate import GENERATIVE, EvalTask
from vlmflow.specs.instruct import InstructSpec
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.pipeline import StepSpec
from vlmflow.specs.schedule import ScheduleSpec
from vlmflow.specs.train import TrainRuntime, TrainStageSpec

DEFAULT_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]


class BpeTokenizer(StrictModel):
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on the dataset's text."""

    kind: Literal["bpe"]
    vocab_size: Int = Field(4096, ge=300, le=1_000_000)
    min_frequency: Int = Field(2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))


class PretrainedTokenizer(StrictModel):
    """A language model's own tokenizer from a local folder (any folder AutoTokenizer loads,
    SentencePiece-only ones included): its bos, eos, pad (unk, else eos, where it has none) and
    chat_template are kept, and only `<image>` is added, when it has no image token. The path is
    checked when the tokenizer stage runs (full-size specs validate without weights)."""

    kind: Literal["pretrained"]
    path: SpecPath
    special_tokens: list[str] | None = Field(
        None,
        description="instead, add these tokens where missing to the folder's tokenizer.json (or this "
        "tokenizer.json) and use vlmflow's special tokens, e.g. the default BPE's list; default: the tokenizer's own",
    )


Tokenizer = Annotated[BpeTokenizer | PretrainedTokenizer, Field(discriminator="kind")]


class RaySpec(StrictModel):
    address: str | None = Field(None, description="join this cluster; default: $RAY_ADDRESS or a local Ray")
    num_cpus: Int | None = Field(None, ge=1, description="CPUs for a local Ray; default: all")
    include_dashboard: bool = Field(
        False,
        description="start Ray's dashboard with a local Ray (http://127.0.0.1:8265: tasks, actors, logs); "
        "off by default: it costs start-up time and memory",
    )
    ship_code: bool = Field(
        True, description="on a cluster, send this vlmflow code to the workers (runtime_env py_modules)"
    )


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite in the workdir")
    experiment: str | None = Field(None, description="default: the recipe name")
    system_metrics: bool = Field(
        True, description="log MLflow's system metrics (CPU, memory, GPU) on the runs of training stages"
    )
    system_metrics_interval: Float = Field(10.0, gt=0, description="seconds between samples")
    history_interval: Float = Field(
        2.0, gt=0, description="seconds between two looks of the driver at a training stage's step history"
    )


class RuntimeSpec(StrictModel):
    workdir: SpecPath | None = Field(None, description="default: --workdir or ./vlmflow-work")
    ray: RaySpec = Field(default_factory=RaySpec)
    train: TrainRuntime = Field(default_factory=TrainRuntime)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    allow_outside_paths: bool = Field(False, description="allow paths outside the spec's folder")
    progress: Literal["auto", "bar", "log"] = "auto"
    executor: Literal["ray", "local"] = Field(
        "ray",
        description="where the stages' work runs: `ray` (Ray tasks and actor pools, Ray started when a stage "
        "first needs it) or `local` (in this process, in order: for tests and debugging). A stage writes the "
        "same artifact either way, so it is in no cache key. Training runs on Ray Train under both: with "
        "`local`, a run that trains still starts Ray, for Ray Train only",
    )


CONCISE_SECTIONS = ("data", "tokenizer", "instruct", "stages", "capfilt", "evaluate")


class Recipe(StrictModel):
    """A VLM recipe: its graph in the concise sections (data, tokenizer, instruct, stages,
    capfilt, evaluate) or as an explicit `pipeline:`, plus what every step shares (seed, model,
    runtime)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: Seed = 0
    data: DataSpec | None = Field(None, description="the data sources, filters and dedup (concise form)")
    tokenizer: Tokenizer | None = None
    instruct: InstructSpec | None = Field(None, description="LLaVA-style synthetic instruction data (instruct stage)")
    model: ModelSpec | None = None
    stages: list[TrainStageSpec] = Field(default_factory=list)
    capfilt: CapfiltSpec | None = Field(
        None, description="BLIP CapFilt: caption and filter noisy pairs (artifact capfilt)"
    )
    evaluate: list[EvalTask] = Field(default_factory=list, description="evaluation tasks, run after training")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    schedule: ScheduleSpec | None = Field(None, description="when `vlmflow schedule` / `vlmflow deploy` run a flow")
    pipeline: list[StepSpec] | None = Field(
        None, description="the graph as explicit steps (uses, with, inputs), instead of the concise sections"
    )
    _context: dict[str, Any] = PrivateAttr(default_factory=dict)  # how the loader validated it: spec_dir, ...

    def validation_context(self) -> dict[str, Any]:
        return dict(self._context)

    def with_context(self, context: dict[str, Any]) -> Recipe:
        self._context = dict(context)
        return self

    def spec_dir(self) -> Path | None:
        """The folder of the spec file: paths in cache keys are relative to it."""
        return self._context.get("spec_dir")

    def data_artifacts(self) -> list[str]:
        """The data stages this recipe produces, which training stages may name as `data:`."""
        produced = ["ingest"] + (["dedup"] if self.data.dedup is not None else [])
        produced += ["instruct"] if self.instruct is not None else []
        return produced + (["capfilt"] if self.capfilt is not None else [])


OBJECTIVE_NEEDS = {"lm": "language", "itc": "text", "siglip": "text", "itm": "text", "itg": "text"}


def cross_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Problems between sections (field location, message); field-level checks live in the models."""
    problems: list[tuple[tuple, str]] = []
    if recipe.pipeline is not None:
        given = [s for s in CONCISE_SECTIONS if getattr(recipe, s)]
        return [((s,), "pipeline: states the whole graph; move this section into a step") for s in given]
    if recipe.data is None:
        return [(("data",), "field required (or a pipeline: of steps)")]
    if recipe.stages and recipe.model is None:
        problems.append((("stages",), "training stages need a model: section"))
    if recipe.stages and recipe.tokenizer is None:
        problems.append((("stages",), "training stages need a tokenizer: section"))
    if recipe.instruct is not None and recipe.instruct.input == "dedup" and recipe.data.dedup is None:
        problems.append((("instruct", "input"), "input is dedup, but data.dedup is off"))
    seen: list[str] = []
    workers = recipe.runtime.train.num_workers
    for i, stage in enumerate(recipe.stages):
        loc = ("stages", i)
        if stage.name in seen:
            problems.append(((*loc, "name"), f"stage name {stage.name!r} is used twice"))
        known = recipe.data_artifacts()
        for field, name in _data_fields(stage):
            if name not in known:
                problems.append(
                    ((*loc, *field), f"unknown data artifact {name!r}; this recipe produces: {', '.join(known)}")
                )
        problems += _source_checks(recipe, [(field, c.sources) for field, c in _components(stage, loc)])
        if stage.init_from not in (None, "previous", *seen):
            problems.append(((*loc, "init_from"), f"{stage.init_from!r} is not an earlier stage"))
        if stage.batch_size % (workers * stage.micro_batch_size):
            problems.append(
                (
                    (*loc, "batch_size"),
                    f"batch_size {stage.batch_size} is not a multiple of runtime.train.num_workers ({workers}) "
                    f"x micro_batch_size ({stage.micro_batch_size})",
                )
            )
        if recipe.model is not None:
            problems += _model_checks(recipe.model, stage, loc)
        seen.append(stage.name)
    return problems + _text_tokenizer_checks(recipe) + _capfilt_checks(recipe) + _evaluate_checks(recipe)


def _text_tokenizer_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """A pretrained text tower reads its own tokenizer's ids: the recipe's tokenizer is its folder's."""
    text, tokenizer = recipe.model.text if recipe.model else None, recipe.tokenizer
    if text is None or text.kind in ("tiny-text", "qformer") or tokenizer is None:
        return []
    language = recipe.model.language
    if language is not None and language.kind == "hf-causal-lm" and language.path != text.path:
        message = (
            f"model.text ({text.kind}, {text.path}) and model.language (hf-causal-lm, {language.path}) read the ids "
            "of different tokenizers, and a recipe has one: use a tiny-text encoder or a language model of the "
            "text tower's tokenizer (tiny-llama)"
        )
        return [(("model", "text", "path"), message)]
    if tokenizer.kind == "pretrained" and tokenizer.path in (text.path, text.path / "tokenizer.json"):
        return []
    loc = ("tokenizer", "path") if tokenizer.kind == "pretrained" else ("tokenizer", "kind")
    message = f"model.text is a pretrained {text.kind} tower: feed it its own tokenizer's ids with "
    return [(loc, message + f"tokenizer: {{kind: pretrained, path: {text.path}}}")]


def _source_checks(recipe: Recipe, fields: list[tuple[tuple, list[str] | None]]) -> list[tuple[tuple, str]]:
    names = recipe.data.source_names()
    return [
        ((*field, "sources", j), f"unknown source {name!r}; data.sources has: {', '.join(names)}")
        for field, sources in fields
        for j, name in enumerate(sources or [])
        if name not in names
    ]


def _components(stage: TrainStageSpec, loc: tuple) -> list[tuple[tuple, object]]:
    if isinstance(stage.data, str):
        return []
    return [((*loc, "data", "mixture", j), c) for j, c in enumerate(stage.data.mixture)]


def _capfilt_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """CapFilt reads an earlier data artifact with models that can caption and match; the
    stages it uses are trained before the first stage that reads its output."""
    spec = recipe.capfilt
    if spec is None:
        return []
    problems: list[tuple[tuple, str]] = []
    known = [a for a in recipe.data_artifacts() if a != "capfilt"]
    if spec.data not in known:
        message = f"unknown data artifact {spec.data!r}; CapFilt can read: {', '.join(known)}"
        problems.append((("capfilt", "data"), message))
    problems += _source_checks(recipe, [(("capfilt",), spec.sources)])
    stages = [s.name for s in recipe.stages]
    readers = [i for i, s in enumerate(recipe.stages) if "capfilt" in s.artifacts()]
    roles = [("captioner", spec.captioner.model if spec.captioner else None, "language")]
    roles.append(("filter", spec.filter.model, "text"))
    for role, ref, part in roles:
        if ref is None:
            continue
        loc = ("capfilt", role, "model")
        if ref.stage is not None:
            if ref.stage not in stages:
                problems.append(((*loc, "stage"), f"{ref.stage!r} is not a training stage: {', '.join(stages)}"))
            elif readers and stages.index(ref.stage) >= readers[0]:
                reader = stages[readers[0]]
                message = f"stage {ref.stage!r} must come before {reader!r}, which trains on the capfilt output"
                problems.append(((*loc, "stage"), message))
            elif recipe.model is not None and getattr(recipe.model, part) is None:
                problems.append(((*loc, "stage"), f"the {role} needs model.{part}"))
        elif ref.parts() is not None and part not in ref.parts():
            if architecture := hf_architecture(ref.path):
                wanted = next(a for a, p in HF_BLIP.items() if p == part)
                message = f"the model in {ref.path} is a {architecture}; the {role} needs a {wanted}"
            else:
                message = f"the model in {ref.path} has no {part} part; the {role} needs one"
            problems.append(((*loc, "path"), message))
    problems += _calibration_checks(recipe)
    derived = [f"{name}-r{r}" for name in spec.retrained_stages() for r in range(2, spec.rounds + 1)]
    if taken := [name for name in derived if name in stages]:
        message = f"round {taken[0].rsplit('-r', 1)[1]} trains a stage named {taken[0]!r}, as a stage of stages: is"
        problems.append((("capfilt", "rounds"), message + "; rename that stage"))
    return problems


def _calibration_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """The calibration source exists, is not judged itself and has held-out (val) rows."""
    calibrate, loc = recipe.capfilt.filter.calibrate, ("capfilt", "filter", "calibrate", "source")
    if calibrate is None:
        return []
    names = recipe.data.source_names()
    if calibrate.source not in names:
        return [(loc, f"unknown source {calibrate.source!r}; data.sources has: {', '.join(names)}")]
    source = recipe.data.sources[names.index(calibrate.source)]
    if recipe.capfilt.sources is not None and calibrate.source in recipe.capfilt.sources:
        return [(loc, f"{calibrate.source!r} is in capfilt.sources (judged as web data); calibrate on a clean source")]
    if source.split != "val" and not getattr(source, "val_fraction", 0):
        how = "give it val_fraction" if hasattr(source, "val_fraction") else "add a source of it with split: val"
        return [(loc, f"source {calibrate.source!r} has no held-out rows (split val); {how}")]
    return []


def _evaluate_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Each task names a trained stage, a data artifact of the recipe and what its model can do."""
    problems: list[tuple[tuple, str]] = []
    names, stages = [], [s.name for s in recipe.stages]
    for i, task in enumerate(recipe.evaluate):
        loc = ("evaluate", i)
        if task.name in names:
            problems.append(((*loc, "name"), f"task name {task.name!r} is used twice"))
        names.append(task.name)
        if not stages:
            problems.append(((*loc,), "evaluation needs a training stage (stages: is empty)"))
        elif task.model is not None and task.model not in stages:
            problems.append(((*loc, "model"), f"{task.model!r} is not a training stage: {', '.join(stages)}"))
        if task.data.kind == "held-out" and task.data.artifact not in recipe.data_artifacts():
            known = ", ".join(recipe.data_artifacts())
            message = f"unknown data artifact {task.data.artifact!r}; this recipe produces: {known}"
            problems.append(((*loc, "data", "artifact"), message))
        model = recipe.model
        if model is None:
            continue
        if task.kind in GENERATIVE and model.language is None:
            problems.append(((*loc, "kind"), f"{task.kind} generates text: it needs model.language"))
        if getattr(task, "shots", 0) and (model.connector is None or model.connector.kind != "flamingo"):
            problems.append(((*loc, "shots"), "in-context examples need a model with connector kind flamingo"))
        elif getattr(task, "shots", 0) and task.data.kind != "held-out":
            problems.append(((*loc, "shots"), "in-context examples come from a held-out artifact's train split"))
        if task.kind == "retrieval" and model.text is None:
            problems.append(((*loc, "kind"), "retrieval ranks embeddings: it needs model.text"))
        if task.kind == "image-text-matching" and model.text is None:
            problems.append(((*loc, "kind"), "image-text matching uses the ITM head: it needs model.text"))
        if task.kind == "zero-shot-classification":
            method = task.method if task.method != "auto" else ("embedding" if model.text else "likelihood")
            part = "text" if method == "embedding" else "language"
            if getattr(model, part) is None:
                problems.append(((*loc, "method"), f"{method} ranking needs model.{part}"))
    return problems


def _data_fields(stage: TrainStageSpec) -> list[tuple[tuple, str]]:
    if isinstance(stage.data, str):
        return [(("data",), stage.data)]
    return [(("data", "mixture", j, "data"), c.data) for j, c in enumerate(stage.data.mixture)]


def _model_checks(model: ModelSpec, stage: TrainStageSpec, loc: tuple) -> list[tuple[tuple, str]]:
    problems = []
    for j, objective in enumerate(stage.objectives):
        part = OBJECTIVE_NEEDS[objective.kind]
        if getattr(model, part) is None:
            problems.append(((*loc, "objectives", j, "kind"), f"{objective.kind} needs model.{part}"))
        elif objective.kind == "itg" and model.text.kind != "qformer":
            problems.append(((*loc, "objectives", j, "kind"), "itg decodes with the Q-Former: needs text kind qformer"))
    parts = {"vision": True, "connector": model.connector is not None and model.language is not None}
    parts |= {"language": model.language is not None, "text": model.text is not None, "heads": model.text is not None}
    for j, name in enumerate(stage.trainable):
        if not parts[name]:
            problems.append(((*loc, "trainable", j), f"the model has no {name} part"))
    if stage.lora is not None and not parts[stage.lora.module]:
        problems.append(((*loc, "lora", "module"), f"the model has no {stage.lora.module} part"))
    if model.vision.kind == "none" and "vision" in stage.trainable:
        problems.append(((*loc, "trainable"), "vision kind none has no weights to train"))
    if stage.images_per_sequence > 1 and (model.connector is None or model.connector.kind != "flamingo"):
        problems.append(((*loc, "images_per_sequence"), "interleaved sequences need connector kind flamingo"))
    if stage.packing and model.connector is not None and model.connector.kind == "flamingo":
        why = "packing splices image tokens into the text; connector kind flamingo cross-attends to the images"
        problems.append(((*loc, "packing"), why))
    return problems
