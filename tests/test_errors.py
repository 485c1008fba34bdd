"""One root for the library's errors: every `...Error` of aape/ is an AAPEError and keeps its builtin base."""

import importlib
import inspect
import pickle
import pkgutil

import aape
from aape.config import ConfigError
from aape.data import DataError
from aape.errors import AAPEError, describe
from aape.prompts.errors import LLMError, TemplateError


def library_errors() -> dict[str, type]:
    """Every exception class whose name ends in 'Error' defined in any module of aape/."""
    found = {}
    for info in pkgutil.walk_packages(aape.__path__, "aape."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and name.endswith("Error"):
                found[f"{module.__name__}.{name}"] = cls
    return found


def test_every_library_error_derives_from_aape_error():
    errors = library_errors()
    assert {"aape.config.ConfigError", "aape.method.checkpoint.CheckpointError", "aape.prompts.errors.LLMError"} <= set(errors)
    assert [name for name, cls in errors.items() if not issubclass(cls, AAPEError)] == []


def test_builtin_bases_are_kept_for_callers_that_catch_them():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError) and issubclass(TemplateError, ValueError)
    assert issubclass(LLMError, RuntimeError)


def test_message_hint_and_exit_code():
    error = ConfigError("bad value for 'data.shots': 0", hint="use a positive number of shots")
    assert describe(error) == "error: bad value for 'data.shots': 0\nhint: use a positive number of shots"
    assert describe(LLMError("the server refused")) == "error: the server refused"
    assert (ConfigError.exit_code, LLMError.exit_code) == (2, 1)
    copy = pickle.loads(pickle.dumps(error))  # Prefect and process pools move errors by pickling
    assert (type(copy), str(copy), copy.hint) == (ConfigError, str(error), error.hint)
