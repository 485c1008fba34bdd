"""Stage 1: class names -> natural-language descriptions (CuPL style), written to Parquet.

Sources: an OpenAI-compatible chat endpoint, an offline local model (SmolLM2-135M GGUF), or an
existing CuPL-style JSON file. Other stages read the result with `load_descriptions` and
`descriptions_by_class`.
"""

from aape.prompts.table import DESCRIPTION_COLUMNS, DESCRIPTION_SCHEMA, descriptions_by_class, load_descriptions

__all__ = ["DESCRIPTION_COLUMNS", "DESCRIPTION_SCHEMA", "descriptions_by_class", "load_descriptions"]
