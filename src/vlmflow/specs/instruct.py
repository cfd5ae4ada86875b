"""The `instruct:` section: LLaVA-style synthetic instruction data (three task types).

`generator.kind` picks the backend: `offline` writes the three task types from the scene
graph alone (no server); `openai-compatible` asks any OpenAI-compatible chat endpoint
(OpenAI, vLLM, Ollama, `vlmflow mock-llm`). The API key is read at run time from the
environment variable named by `api_key_env`; it never enters the spec, the digest or MLflow.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from vlmflow.component import is_operational, operational
from vlmflow.specs.base import ExistingDir, Float, Int, Seed, StrictModel
from vlmflow.specs.data import NAME_PATTERN

TASKS = ("conversation", "detail", "complex_reasoning")
Task = Literal["conversation", "detail", "complex_reasoning"]
# LLaVA-Instruct-158K: 58K conversations, 23K detailed descriptions, 77K complex reasoning.
LLAVA_MIX = {"conversation": 58.0, "detail": 23.0, "complex_reasoning": 77.0}
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class OfflineGenerator(StrictModel):
    """Deterministic: every statement is true of the scene graph (objects with boxes)."""

    kind: Literal["offline"]
    min_turns: Int = Field(2, ge=1, le=10, description="question/answer pairs per conversation, at least")
    max_turns: Int = Field(5, ge=1, le=10, description="question/answer pairs per conversation, at most")

    @model_validator(mode="after")
    def _check(self) -> OfflineGenerator:
        if self.min_turns > self.max_turns:
            raise ValueError("min_turns must be <= max_turns")
        return self


class OpenAICompatibleGenerator(StrictModel):
    """Any server speaking POST {base_url}/chat/completions (OpenAI, vLLM, Ollama, mock-llm)."""

    kind: Literal["openai-compatible"]
    base_url: str = Field("https://api.openai.com/v1", description="the API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field("gpt-4o-mini", min_length=1)
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", pattern=ENV_NAME, description="environment variable holding the key; null: no key"
    )
    temperature: Float = Field(0.2, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: Int = Field(1024, ge=16, le=65536)
    seed: Seed | None = Field(None, description="sent to servers that support it")
    json_mode: bool = Field(False, description='send response_format {"type": "json_object"}')
    max_reasks: Int = Field(2, ge=0, le=10, description="re-ask after an unusable reply, at most this many times")
    # Operational knobs: they do not change what is generated, so they stay out of the cache key.
    concurrency: Int = operational(16, ge=1, le=1024, description="requests in flight at most")
    requests_per_minute: Int | None = operational(None, ge=1)
    tokens_per_minute: Int | None = operational(None, ge=1)
    max_retries: Int = operational(6, ge=0, le=50, description="retries per request on 429 / 5xx / timeouts")
    backoff_base_s: Float = operational(0.5, gt=0.0, le=60.0)
    backoff_max_s: Float = operational(30.0, gt=0.0, le=600.0)
    timeout_s: Float = operational(60.0, gt=0.0, le=3600.0, description="per request")
    price_per_1k_input: Float = operational(0.0, ge=0.0, description="USD per 1000 prompt tokens (cost estimate)")
    price_per_1k_output: Float = operational(0.0, ge=0.0, description="USD per 1000 completion tokens (cost estimate)")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


OPERATIONAL = tuple(n for n, f in OpenAICompatibleGenerator.model_fields.items() if is_operational(f))

Generator = Annotated[OfflineGenerator | OpenAICompatibleGenerator, Field(discriminator="kind")]


class InstructSpec(StrictModel):
    """LLaVA-style instruction data from captions + boxes of the recipe's images."""

    generator: Generator = Field(default_factory=lambda: OfflineGenerator(kind="offline"))
    input: Literal["auto", "ingest", "dedup"] = operational(
        "auto", description="concise form: which data section it reads (auto: dedup's rows when dedup runs)"
    )
    splits: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=lambda: ["train"], min_length=1, description="only images of these splits get data"
    )
    mix: dict[Task, Float] = Field(
        default_factory=lambda: dict(LLAVA_MIX), description="relative share of each task type (0 turns one off)"
    )
    limit: Int | None = Field(None, ge=1, description="at most this many images")
    templates: ExistingDir | None = operational(  # its content is in the cache key (instruct's fingerprint)
        None, description="prompt templates folder; default: the built-in one"
    )
    shard_size: Int | None = Field(None, ge=1, description="samples per output shard; default: data.shard_size")
    export_images: bool = Field(False, description="also write images/KEY.EXT beside llava_instruct.json")
    sample_conversations: Int = Field(20, ge=0, le=1000, description="conversations in the MLflow sample artifact")

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()):
            raise ValueError("mix shares must be >= 0")
        if sum(value.values()) <= 0:
            raise ValueError("at least one task type needs a share > 0")
        return value
