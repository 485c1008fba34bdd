"""AAPE_* process switches: one reader, one message form (each switch's own refusal is tested beside
its module: test_allocator.py, test_fused_head.py)."""

import pytest

from aape import switches
from aape.errors import AAPEError


class _Refused(AAPEError):
    pass


def test_unset_switch_takes_its_first_choice(monkeypatch):
    monkeypatch.delenv("AAPE_TEST_SWITCH", raising=False)
    assert switches.choice("AAPE_TEST_SWITCH", ("auto", "off"), _Refused) == "auto"


def test_value_is_read_case_and_space_insensitively(monkeypatch):
    monkeypatch.setenv("AAPE_TEST_SWITCH", "  OFF ")
    assert switches.choice("AAPE_TEST_SWITCH", ("auto", "off"), _Refused) == "off"


def test_unknown_value_names_the_variable_the_choices_and_the_hint(monkeypatch):
    monkeypatch.setenv("AAPE_TEST_SWITCH", "sometimes")
    with pytest.raises(_Refused) as refused:
        switches.choice("AAPE_TEST_SWITCH", ("auto", "off"), _Refused, hint="unset it")
    assert str(refused.value) == "AAPE_TEST_SWITCH='sometimes' is not one of auto, off; unset it"

