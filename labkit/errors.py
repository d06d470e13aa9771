"""The errors labkit raises for its users to read: each names the culprit and what to do."""
from __future__ import annotations


class ParameterError(ValueError):
    """A notebook parameter has a wrong type or value (the message names it, its value and what is allowed)."""
