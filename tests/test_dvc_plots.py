"""`aape plots`: DVC's plot pages with their chart libraries inline, so they render without internet."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from aape.integrations.dvc_plots import offline_template


def _page(tmp_path, template: str | None):
    from dvc_render import VegaRenderer, render_html

    history = [{"epoch": e, "val_accuracy": 20 + e, "train_accuracy": 30 + 2 * e, "rev": "workspace"} for e in range(1, 6)]
    datapoints = [{**point, "filename": "history.json", "field": field, "y": point[field]} for point in history
                  for field in ("val_accuracy", "train_accuracy")]
    renderers = [VegaRenderer(datapoints, f"curves-{i}", template="linear", x="epoch", y="y") for i in range(2)]
    out = tmp_path / ("offline" if template else "default") / "index.html"
    if template:
        (tmp_path / "template.html").write_text(template)
    render_html(renderers, out, html_template=str(tmp_path / "template.html") if template else None)
    return out


def test_the_template_carries_the_chart_libraries_and_fetches_nothing():
    page = offline_template()
    assert "{plot_divs}" in page and "{refresh_tag}" in page  # DVC's placeholders
    assert "{scripts}" not in page  # so DVC does not add its CDN script tags
    assert not re.search(r"<script[^>]*\ssrc\s*=|<link[^>]*\shref\s*=", page)  # no script or stylesheet loaded from anywhere
    assert "window.vegaEmbed=" in page and len(page) > 500_000  # the bundle itself, not a link to it


def test_a_dvc_page_built_with_it_has_no_network_reference(tmp_path):
    default = _page(tmp_path, None).read_text()
    assert "cdn.jsdelivr.net" in default  # what goes blank offline
    offline = _page(tmp_path, offline_template()).read_text()
    assert "cdn.jsdelivr.net" not in offline and offline.count("vegaEmbed('#") == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium (apt-get install chromium) to render the page")
def test_the_page_draws_its_charts_in_a_browser_without_network(tmp_path):
    page = _page(tmp_path, offline_template())
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="marks"') == 2  # one drawn Vega chart per plot


def test_aape_plots_hands_dvc_the_offline_template(monkeypatch):
    from aape.cli import main

    seen = {}

    def fake_dvc(command, env):
        template = command[command.index("--html-template") + 1]
        seen["command"], seen["template"] = command, open(template).read()
        return 0

    monkeypatch.setattr("aape.cli._run_command", fake_dvc)
    result = CliRunner().invoke(main, ["plots", "diff", "HEAD~1", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert seen["command"][2:5] == ["dvc", "plots", "diff"] and seen["command"][-3:] == ["HEAD~1", "-o", "out"]
    assert seen["template"] == offline_template()
    json.dumps(seen["command"])  # plain strings, as a subprocess gets them
