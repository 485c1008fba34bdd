"""aape.network.host_reachable: the one host probe (the backbone's weights, the dataset downloads),
with each old probe's port choice: https and bare host names on 443, http on 80, an explicit port kept."""

from __future__ import annotations

import socket

import pytest

from aape import backbone
from aape.data import download
from aape.network import host_reachable


class _Connection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def dialled(monkeypatch):
    calls = []

    def connect(address, timeout):
        calls.append((address, timeout))
        if address[0].endswith(".invalid"):
            raise socket.gaierror("no such host")
        return _Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    return calls


@pytest.mark.parametrize(
    "url, address",
    [
        ("https://huggingface.co", ("huggingface.co", 443)),
        ("huggingface.co", ("huggingface.co", 443)),
        ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", ("data.vision.ee.ethz.ch", 80)),
        ("https://host.example:8443/x", ("host.example", 8443)),
    ],
)
def test_the_probe_dials_the_hosts_port(dialled, url, address):
    assert host_reachable(url) is True
    assert dialled == [(address, 3.0)]


def test_an_unreachable_host_is_a_false_not_an_error(dialled):
    assert host_reachable("https://no-such-host.invalid/x", timeout=0.5) is False
    assert dialled == [(("no-such-host.invalid", 443), 0.5)]


def test_backbone_and_downloads_use_this_probe():
    assert backbone.host_reachable is host_reachable and download.host_reachable is host_reachable
