"""AAPE_* process switches: one reader, one message form, used by the allocator and the fused head."""

import pytest

from aape import allocator, switches
from aape.errors import AAPEError
from aape.method import fused_head


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


@pytest.mark.parametrize(
    ("variable", "read", "error"),
    [("AAPE_RETAIN_MEMORY", allocator.mode, allocator.AllocatorSettingError),
     ("AAPE_FUSED_HEAD", fused_head.mode, fused_head.FusedHeadError)],
)
def test_each_switch_refuses_unknown_values_with_its_own_error(monkeypatch, variable, read, error):
    monkeypatch.setenv(variable, "maybe")
    with pytest.raises(error, match=f"^{variable}='maybe' is not one of "):
        read()
