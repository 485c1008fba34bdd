"""`dvc plots show` / `dvc plots diff` pages that render without internet.

DVC's HTML loads Vega, Vega-Lite and Vega-Embed from a CDN, so on an offline machine (or any
machine behind a proxy) the training curves come out blank. DVC accepts a custom page template
(`--html-template`), and takes the CDN scripts out when the template has no `{scripts}` slot; this
template carries the three libraries inline instead, from the JavaScript bundle that
vl-convert-python ships in its wheel.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <script type="text/javascript">
/* Vega {vega}, Vega-Lite and Vega-Embed {embed}: vl-convert-python's bundle, inlined so the page needs no network */
{bundle}
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


@lru_cache(maxsize=1)
def offline_template() -> str:
    """The page template: DVC's placeholders `{refresh_tag}` and `{plot_divs}`, the libraries inline."""
    import vl_convert as vlc

    # the plots' own <script> blocks call vegaEmbed(...) as the page is parsed: a global is needed
    bundle = vlc.javascript_bundle("window.vega = vega; window.vegaLite = vegaLite; window.vegaEmbed = vegaEmbed;")
    bundle = bundle.replace("</script", "<\\/script")  # a literal end tag in the code would end the block
    page = _PAGE.replace("{{", "{").replace("}}", "}")  # before the bundle goes in: its code has braces of its own
    page = page.replace("{vega}", vlc.get_vega_version()).replace("{embed}", vlc.get_vega_embed_version())
    return page.replace("{bundle}", bundle)


def write_offline_template(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_template(), encoding="utf-8")
    return path
