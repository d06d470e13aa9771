"""A Sphinx math renderer that writes MathML at build time (``html_math_renderer = "mathml"``).

Sphinx's default renderer loads MathJax from a CDN, which a site read offline (``file://``, a lab
machine without internet) cannot reach. Browsers render MathML natively (MathML Core), so converting
each formula once with ``latex2mathml`` (pure Python) needs no JavaScript and no network.
"""
from __future__ import annotations

from html import escape
from typing import Any

from docutils import nodes


def _mathml(latex: str, display: str) -> str:
    from latex2mathml.converter import convert

    try:
        return convert(latex, display=display)
    except Exception:  # noqa: BLE001 - a formula the converter cannot read is shown as its LaTeX
        return f'<code class="math-source">{escape(latex)}</code>'


def visit_math(self: Any, node: nodes.Element) -> None:
    """Inline math: ``$x^2$``."""
    self.body.append(_mathml(node.astext(), "inline"))
    raise nodes.SkipNode


def visit_displaymath(self: Any, node: nodes.Element) -> None:
    """Display math: ``$$ ... $$`` or a ``math`` directive."""
    self.body.append(f'<div class="math">{_mathml(node.astext(), "block")}</div>\n')
    raise nodes.SkipNode


def setup(app: Any) -> dict[str, Any]:
    """Register the ``mathml`` renderer with Sphinx."""
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
