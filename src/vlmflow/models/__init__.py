"""VLM parts (vision towers, connectors, language models, heads) and their assembly."""
