"""An executed notebook becomes one self-contained HTML page beside it."""

import base64

import nbformat

from workbench.views.html import write_html

# a 1x1 PNG
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5f1b7d00000000049454e44ae426082")).decode()


def test_executed_notebook_is_written_as_html_with_its_figures_inline(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('hi')")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG}),
                    nbformat.v4.new_output("stream", name="stdout", text="finding 42\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), cell]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    html = write_html(path)
    assert html == tmp_path / "01_x.html"
    text = html.read_text()
    assert "finding 42" in text and f"data:image/png;base64,{PNG}" in text
    assert '<link rel="stylesheet" href="' not in text  # styles inline: the page opens offline
