"""vlmflow: turn a vision-language-model recipe into a reproducible pipeline."""

__version__ = "0.1.0"
