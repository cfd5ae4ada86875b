"""Synthetic instruction data, LLaVA style: the `instruct` stage and its parts.

context (captions + boxes per image) -> templates (system prompt, few-shot examples, query per
task type) -> a backend (`offline` from the scene graph, or any OpenAI-compatible endpoint
through `client` with the persistent `cache`) -> `replies` validated into turns -> LLaVA JSON
+ shards. `mock_server` is an OpenAI-compatible server for tests and benchmarks; `verify`
checks answers against a scene graph.
"""
