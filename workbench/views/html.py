"""An executed notebook as one self-contained HTML page (figures embedded, no Jupyter needed to read it)."""

from __future__ import annotations

from pathlib import Path


def write_html(notebook: str | Path) -> Path:
    """Write `<notebook>.html` beside the executed `notebook` (its PNG outputs inline as data URIs, the page's
    styles inline) and return its path."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target
