"""`vlmflow.builtin`: the built-in recipes and instruct templates as package data (see pyproject.toml).

This file makes specs/ a regular package, so an editable install can import it too.
"""
