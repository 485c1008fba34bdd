"""Errors of the prompt stage. Each message names the culprit (file, key, class) and what to do."""

from __future__ import annotations

from aape.errors import AAPEError


class PromptsError(AAPEError, ValueError):
    """Bad input to the prompt stage: a class list, a template choice, a description file."""


class TemplateError(PromptsError):
    """The template file or the prompts.templates choice is wrong."""


class CuplFileError(PromptsError):
    """A CuPL-style JSON file is missing or not {class name: [sentences]}."""


class UnmatchedClassesError(PromptsError):
    """Classes of classes.json found no key in the CuPL file and prompts.allow_unmatched is false."""


class TooFewDescriptionsError(PromptsError):
    """A class kept fewer than prompts.min_per_class descriptions after cleaning."""


class LLMError(AAPEError, RuntimeError):
    """Talking to the LLM failed in a way retrying cannot fix (or the retry budget ran out)."""


class LocalModelError(AAPEError, RuntimeError):
    """The offline local model cannot be found or loaded."""
