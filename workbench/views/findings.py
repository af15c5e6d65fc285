"""Regenerate the README's findings block (short: per notebook a table, the one-line answers, scope and time,
provenance, figures) and docs/findings.md (every generated conclusion) from executed notebooks' JSON summaries.

`python -m workbench.views.findings --from runs/demo` copies the figures to `docs/figures/` and rewrites, per
notebook whose summary is in the source folder, that notebook's section of both files; a notebook that was not
run there keeps its section as it was. Each section states the commit, date and machine it came from. Where a
section is replaced by numbers from another machine or commit, the numbers that moved beyond `TOLERANCE` are
listed in docs/findings.md and printed: never written over silently. Every sentence comes from the summaries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from workbench.views.notebook import provenance as notebook_provenance

START, END = "<!-- findings:start -->", "<!-- findings:end -->"
NOTEBOOKS = {"01_reproduce_nan_explosion": "01_summary.json", "02_compare_freeze_lengths": "02_summary.json"}
FIGURES = {"01_reproduce_nan_explosion": ["01_outcomes.png", "01_seed_chain.png"],
           "02_compare_freeze_lengths": ["02_boundary.png", "02_stability_map.png"]}
FINDINGS_DOC = "docs/findings.md"
TOLERANCE = {"rel": 0.05, "abs": 1e-3}  # numbers closer than this are the same finding on another machine
MAX_BLOCK_LINES = 60
_LINK_CHARS = 90


def _section_markers(stem: str) -> tuple[str, str]:
    return f"<!-- section:{stem} -->", f"<!-- /section:{stem} -->"


def sections(text: str) -> dict[str, str]:
    """stem -> the section's text (markers included) found in `text`. A block written before sections had markers
    (paragraphs opening "From `notebooks/<stem>.ipynb`") is split at those openings, so its notebooks' findings
    are kept, marked as older, until each notebook is re-run."""
    out = {}
    for stem in NOTEBOOKS:
        begin, end = _section_markers(stem)
        m = re.search(re.escape(begin) + r".*?" + re.escape(end), text, flags=re.S)
        if m:
            out[stem] = m.group(0)
    if not out:
        lines = text.splitlines()
        figures = [line for line in lines if line.startswith("![")]
        prose = "\n".join(line for line in lines if not line.startswith("!["))
        for part in re.split(r"(?m)^(?=From `notebooks/\d\d_\w+\.ipynb`)", prose):
            m = re.match(r"From `notebooks/(\d\d_\w+)\.ipynb`", part)
            if m and m.group(1) in NOTEBOOKS:
                stem = m.group(1)
                begin, end = _section_markers(stem)
                own = [f for f in figures if f.startswith(f"![{stem[:3]}")]
                out[stem] = "\n".join([begin, "(Kept from an earlier regeneration without provenance: commit, date "
                                        "and machine unknown; re-run the notebook to replace it.)", "", part.strip(),
                                        *([""] + own if own else []), end])
    return out


def provenance(summary_path: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """Where a summary came from: the `provenance` the notebook recorded when it wrote it, else (older summaries)
    the commit of the checkout this package runs from, the summary file's time and this machine."""
    if isinstance(summary.get("provenance"), Mapping):
        return dict(summary["provenance"])
    return notebook_provenance(summary_path.stat().st_mtime)


def _counts(outcomes: Mapping[str, int]) -> str:
    from workbench.records import OUTCOMES

    total = sum(outcomes.values())
    return ", ".join(f"{outcomes[k]}/{total} {k}" for k in OUTCOMES if outcomes.get(k))


def _short(text: str | None) -> str:
    text = (text or "-").replace("|", "/")
    return text if len(text) <= _LINK_CHARS else text[:_LINK_CHARS - 1] + "…"


def _median(values: Sequence[Any]) -> float | None:
    present = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _rnnt(c: Mapping[str, Any]) -> str:
    """`0.83 (ratio 1.1; 3/3 functional)`: the final RNN-T PER, only meaningful where the decoder is functional."""
    ratios = [r for r in c.get("val_rnnt_length_ratio", []) if r is not None]
    if not ratios:
        return "-"
    functional = sum(bool(f) for f in c.get("val_rnnt_functional", []))
    return f"{_g(_median(c.get('val_rnnt_per', [])))} (ratio {_g(_median(ratios))}; {functional}/{len(ratios)} functional)"


def _comparisons(s: Mapping[str, Any]) -> list[str]:
    """The paired comparisons' count and what chance alone would give, from a summary's `comparisons`."""
    t = s.get("comparisons")
    if not t:
        return []
    return [f"{t['comparisons']} paired comparisons in errors over {t['seeds']} seeds; {t['all_same_direction']} came "
            f"out the same way in every seed, where chance alone would give {t['expected_by_chance']:.1f}."]


def digest_01(s: Mapping[str, Any]) -> dict[str, Any]:
    """Notebook 01 at a glance: configuration -> outcomes over seeds, median final CTC PER against its step-matched
    CTC-only control, the final RNN-T PER with its length ratio and functional count, decisive link."""
    rows, numbers = [], {}
    for c in s.get("configs", []):
        per = _median(c.get("val_per", []))
        control = _median(c.get("control_val_per", []))
        link = next((d for d in c.get("decisive", []) if d), None)
        rows.append(f"| {c['name']} | {_counts(c['outcomes'])} | {_g(per)} ({_g(control)}) | {_rnnt(c)} | "
                    f"{_short(link)} |")
        numbers[f"{c['name']}: healthy seeds"] = c["outcomes"].get("healthy", 0)
        numbers[f"{c['name']}: diverged seeds"] = c["outcomes"].get("diverged", 0)
        if per is not None:
            numbers[f"{c['name']}: median final CTC PER"] = per
    table = ["| configuration | outcomes over seeds | final CTC PER (its CTC-only control, same steps) | final RNN-T "
             "PER (hyp/ref length ratio; functional seeds) | decisive link (first seed with one) |",
             "|---|---|---|---|---|", *rows]
    healthy = [c["name"] for c in s.get("configs", []) if c["outcomes"].get("healthy", 0) == sum(c["outcomes"].values())]
    seeds = s.get("signature_by_seed", [])
    answers = [f"Does the seed's NaN explosion reproduce? Its signature in {sum(map(bool, seeds))} of {len(seeds)} "
               f"seeds. Healthy in every seed: {', '.join(healthy) if healthy else 'no configuration'}."]
    effects = [line for line in s.get("conclusions", []) if line.startswith("Final CTC errors minus")]
    counted = effects + _comparisons(s)
    answers += [" ".join(counted)] if counted else []
    return {"question": "Does the seed's NaN explosion reproduce, and which single change makes training healthy?",
            "table": table, "answers": answers, "numbers": numbers, "scope": s.get("scope", "")}


def digest_02(s: Mapping[str, Any]) -> dict[str, Any]:
    """Notebook 02 at a glance: the boundary per policy, loop and N (interval healthy-in-every-seed .. first
    failure, smallest diverged lr) and the answers the boundary search computed."""
    found = s.get("boundary") or {}
    cells = found.get("cells", [])
    ns = sorted({c["freeze_steps"] for c in cells})
    groups: dict[tuple, dict[int, Mapping[str, Any]]] = {}
    numbers: dict[str, Any] = {}
    for c in cells:
        groups.setdefault((c["policy"], c["semantics"], c["precision"], c["budget"]), {})[c["freeze_steps"]] = c
        for key in ("lr_healthy_max", "lr_unhealthy_min", "lr_diverged_min"):
            numbers[f"{c['label']}: {key}"] = c[key]
    table = ["| policy, loop, precision, budget (cell: largest lr healthy in every seed .. smallest lr where some "
             "seed was not; '-' none) | " + " | ".join(f"N={n}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for (policy, semantics, precision, budget), members in sorted(groups.items()):
        loop = "seed_faithful (optimizer kept)" if semantics == "seed_faithful" else semantics
        row = []
        for n in ns:
            c = members.get(n)
            if c is None:
                row.append("")
                continue
            text = f"{_g(c['lr_healthy_max'])} .. {_g(c['lr_unhealthy_min'])}"
            text += f", diverged {_g(c['lr_diverged_min'])}" if c["lr_diverged_min"] is not None else ""
            row.append(text)
        table.append(f"| {policy}, {loop}, {precision}, {budget.replace('_', ' ')} | " + " | ".join(row) + " |")
    first = next((c["first_failure"] for c in cells if c["first_failure"] and c["first_failure"]["decisive_link"]),
                 None)
    # the N answers of the main comparison (fp16, equal steps after the unfreeze) and the precision and budget
    # answers; the other precisions' and budgets' N answers are in the table and in docs/findings.md
    answers = [a for a in found.get("answers", [])[1:] if ", fp16, equal steps after the unfreeze:" in a]
    others = [a for a in found.get("answers", [])[1:] if a.startswith("Did ")]
    answers += [" ".join(others)] if others else []
    if first:
        answers.append(f"First failure with a causal chain: {first['outcome']} at lr {first['lr']:g}: "
                       f"{_short(first['decisive_link'])}")
    # the fixed grid's measures in one line: N compared as paired effects in errors, RNN-T only where it works
    grid = []
    for e in s.get("effects", []):
        if e["effect"] is None:
            continue
        what = "CTC errors after attaching vs step-matched control" if e["measure"].startswith("ctc") else \
            "final RNN-T errors"
        grid.append(f"{e['policy']} lr {e['lr']:g}, {what}, N={e['b']} minus N={e['a']}: {e['effect']['diff_errors']:+.1f} "
                    f"[{e['effect']['low']:+.1f}, {e['effect']['high']:+.1f}] of {e['effect']['ref_tokens']}")
    skipped = sorted({"the decoder was not functional in every seed of both" if "functional" in e["reason"] else
                      "not measured in every seed" for e in s.get("effects", []) if e["effect"] is None})
    functional = [line for line in s.get("conclusions", []) if line.startswith("The fresh decoder was functional")]
    if grid or functional:
        answers.append("Fixed grid, the largest N against the smallest (paired errors, 95% interval): " + "; ".join(grid)
                       + (f" ({len(s['effects']) - len(grid)} more not made: {'; '.join(skipped)})." if skipped
                          else ".")
                       + "".join(f" {line}" for line in functional + _comparisons(s)))
    return {"question": "Does the freeze length N move the stability boundary (lr at which the joint stage stops "
                        "being healthy) by more than the seeds' spread?",
            "table": table,
            "answers": answers, "numbers": numbers, "scope": found.get("scope", s.get("scope", ""))}


DIGESTS = {"01_reproduce_nan_explosion": digest_01, "02_compare_freeze_lengths": digest_02}


def compare_numbers(old: Mapping[str, Any], new: Mapping[str, Any],
                    tolerance: Mapping[str, float] = TOLERANCE) -> list[str]:
    """The numbers that differ between two sections beyond `tolerance` (relative or absolute), one line each."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            if a != b:
                out.append(f"{key}: {a} -> {b}")
            continue
        if not math.isclose(a, b, rel_tol=tolerance["rel"], abs_tol=tolerance["abs"]):
            out.append(f"{key}: {a:g} -> {b:g}")
    return out


def _numbers_of(section: str) -> tuple[dict[str, Any], dict[str, str]]:
    m = re.search(r"<!-- numbers (\{.*?\}) -->", section, flags=re.S)
    if not m:
        return {}, {}
    data = json.loads(m.group(1))
    return data.get("numbers", {}), data.get("provenance", {})


def render(source: Path, figures_dir: Path, readme_dir: Path, doc_dir: Path,
           old_readme: Mapping[str, str], old_doc: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(README sections, docs/findings.md sections, changes) by notebook stem: new ones for the notebooks whose
    summary is in `source`, the old ones kept for the rest; `changes` lists the numbers that moved."""
    readme, doc, changes = dict(old_readme), dict(old_doc), []
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stem, name in NOTEBOOKS.items():
        path = source / stem / name
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        where = provenance(path, s)
        d = DIGESTS[stem](s)
        old_numbers, old_where = _numbers_of(old_doc.get(stem, ""))
        moved = compare_numbers(old_numbers, d["numbers"]) if old_numbers else []
        origin = f"commit {where['commit']}, {where['date']}, {where['machine']}"
        if moved:
            changes += [f"{stem}: {line}" for line in moved]
        figures = []
        for fig in FIGURES[stem]:
            if (source / stem / fig).is_file():
                shutil.copyfile(source / stem / fig, figures_dir / fig)
                figures.append(fig)
        begin, end = _section_markers(stem)
        doc_link = os.path.relpath(doc_dir / "findings.md", readme_dir)
        wall = s.get("wall_s")
        lines = [begin, f"**`notebooks/{stem}.ipynb`**: {d['question']}", "",
                 f"Scope: {d['scope']}" + (f"; the notebook took {wall:.0f} s" if isinstance(wall, (int, float)) else "") + ".",
                 f"From {origin}.", "", *d["table"], "", *[f"- {a}" for a in d["answers"]], "",
                 " ".join(f"![{fig}]({os.path.relpath(figures_dir / fig, readme_dir)})" for fig in figures),
                 f"All conclusions: [{doc_link}]({doc_link}#{stem.replace('_', '-')}).", end]
        readme[stem] = "\n".join(lines)
        numbers = json.dumps({"numbers": d["numbers"], "provenance": where}, sort_keys=True)
        doc_lines = [begin, f"## {stem}", "", f"From {origin}. Scope: {d['scope']}.", ""]
        if moved:
            doc_lines += [f"Numbers that moved beyond the tolerance ({TOLERANCE}) against the previous section (commit "
                          f"{old_where.get('commit')}, {old_where.get('date')}, {old_where.get('machine')}):", "",
                          *[f"- {line}" for line in moved], ""]
        doc_lines += [f"- {c}" for c in s.get("conclusions", [])]
        doc_lines += ["", f"<!-- numbers {numbers} -->", end]
        doc[stem] = "\n".join(doc_lines)
    return readme, doc, changes


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: expected the markers {START} and {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}{END}{tail}")


def current_block(readme: Path) -> str:
    text = readme.read_text()
    return text.split(START, 1)[1].split(END, 1)[0] if START in text and END in text else ""


def regenerate(source: Path, readme: Path, figures: Path, doc: Path) -> list[str]:
    """Rewrite the README block and `doc` from `source`; returns the numbers that moved (also written to `doc`)."""
    old_doc_text = doc.read_text() if doc.is_file() else ""
    readme_sections, doc_sections, changes = render(
        source, figures.resolve(), readme.resolve().parent, doc.resolve().parent, sections(current_block(readme)),
        sections(old_doc_text))
    ordered = [stem for stem in NOTEBOOKS if stem in readme_sections]
    block = "\n\n".join(readme_sections[s] for s in ordered) + "\n"
    if len(block.splitlines()) > MAX_BLOCK_LINES:
        print(f"warning: the findings block has {len(block.splitlines())} lines, more than the {MAX_BLOCK_LINES} it "
              f"should have; shorten the notebooks' tables in workbench/views/findings.py", file=sys.stderr)
    update_readme(readme, block)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("# What the notebooks found: every generated conclusion\n\nRegenerated by "
                   "`python -m workbench.views.findings`; the README's block is the short form.\n\n"
                   + "\n\n".join(doc_sections[s] for s in NOTEBOOKS if s in doc_sections) + "\n")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="runs/demo", help="folder of executed notebooks")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--doc", default=FINDINGS_DOC)
    args = parser.parse_args(argv)
    source, readme = Path(args.source), Path(args.readme)
    if not source.is_dir():
        print(f"error: {source}: no executed notebooks here (run `make demo` first)", file=sys.stderr)
        return 2
    changes = regenerate(source, readme, Path(args.figures), Path(args.doc))
    for line in changes:
        print(f"moved beyond tolerance: {line}")
    print(f"updated {readme} and {args.doc} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
