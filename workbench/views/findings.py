"""Regenerate the README's findings block from executed notebooks' JSON summaries and figures.

`make demo` runs the notebooks, then `python -m workbench.views.findings --from runs/demo` copies their figures to
`docs/figures/` and rewrites the text between the README's findings markers. Every sentence comes from the
summaries; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

START, END = "<!-- findings:start -->", "<!-- findings:end -->"
FIGURES = {"01_reproduce_nan_explosion": ["01_outcomes.png", "01_seed_chain.png", "01_ctc_warmup.png"],
           "02_compare_freeze_lengths": ["02_stability_map.png"]}


def render(source: Path, figures_dir: Path, readme_dir: Path) -> str:
    """Markdown for the findings block, from `source/<notebook stem>/0N_summary.json` and figures."""
    lines = []
    nb01 = source / "01_reproduce_nan_explosion" / "01_summary.json"
    if nb01.is_file():
        s = json.loads(nb01.read_text())
        lines += [f"From `notebooks/01_reproduce_nan_explosion.ipynb` ({s['scope']}; CTC warmup took the validation "
                  f"PER from {s['ctc_val_per_initial']:.3f} to {s['ctc_val_per_final']:.3f}; {s['wall_s']:.0f} s):",
                  ""]
        lines += [f"- {c}" for c in s["conclusions"]]
        lines.append("")
    nb02 = source / "02_compare_freeze_lengths" / "02_summary.json"
    if nb02.is_file():
        s = json.loads(nb02.read_text())
        lines += [f"From `notebooks/02_compare_freeze_lengths.ipynb` ({s['wall_s']:.0f} s):", ""]
        lines += [f"- {c}" for c in s.get("conclusions", [])]
        lines.append("")
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stem, names in FIGURES.items():
        for name in names:
            src = source / stem / name
            if src.is_file():
                shutil.copyfile(src, figures_dir / name)
                lines.append(f"![{name}]({(figures_dir / name).relative_to(readme_dir)})")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: expected the markers {START} and {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="runs/demo", help="folder of executed notebooks")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--figures", default="docs/figures")
    args = parser.parse_args(argv)
    source, readme = Path(args.source), Path(args.readme)
    if not source.is_dir():
        print(f"error: {source}: no executed notebooks here (run `make demo` first)", file=sys.stderr)
        return 2
    update_readme(readme, render(source, Path(args.figures).resolve(), readme.resolve().parent))
    print(f"updated {readme} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
