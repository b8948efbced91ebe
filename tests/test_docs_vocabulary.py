"""The documents, the package and the benchmark scripts describe the product, not how it was made.

Scans README.md, docs/**/*.md, monailabel_metaapp/**/*.py and *.md, benchmarks/**/*.py, *.md and *.sh
for phrases of development history (milestones, work sessions, issue numbers, first-person trial
notes, development-only folders, a hardware description without the hardware) and fails naming
file:line for each.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GLOBS = [
    "README.md",
    "docs/**/*.md",
    "monailabel_metaapp/**/*.py",
    "monailabel_metaapp/**/*.md",
    "benchmarks/**/*.py",
    "benchmarks/**/*.md",
    "benchmarks/**/*.sh",
]

BANNED = {
    r"\b(since|until|before|after|at|in) stops? \d+": "a development milestone",
    r"\bstops? \d+\b(?! ?(s|ms|min|steps?|%))": "a development milestone",
    r"\bsessions? (\d+|N)\b": "a work session",
    r"\bthe issue\b": "the task tracker",
    r"\bissue'?s\b": "the task tracker",
    r"(?<!MONAI Label )(?<!upstream )\bissue #?\d+": "an issue number (cite upstream issues with their project)",
    r"earlier version of this (README|document|page)": "document history",
    r"\b(when )?I (tried|ran|measured|chose|found|picked|looked)\b": "first-person trial notes",
    r"\.devcarry": "a development-only folder",
    r"\bthis project'?s\b.*\b(CPU|GPU|machine)\b": "hardware without a description",
    r"\b(on|beside|of) this (2-core )?CPU\b": "hardware without a description (name the CPU)",
    r"\b(the )?device tool\b": "development tooling",
}
PATTERNS = [(re.compile(p, re.IGNORECASE), why) for p, why in BANNED.items()]
SELF = Path(__file__).resolve()


def files() -> list[Path]:
    out: set[Path] = set()
    for g in GLOBS:
        out.update(p for p in ROOT.glob(g) if p.is_file())
    skip = {"logs", "bin", "model", "__pycache__"}
    return sorted(p for p in out if p.resolve() != SELF and not skip & set(p.relative_to(ROOT).parts))


def offences() -> list[str]:
    found = []
    for path in files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pat, why in PATTERNS:
                if m := pat.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} ({why})")
    return found


def test_patterns_catch_examples():
    examples = [
        "since stop 14 the head",
        "in session 1's runs",
        "well under the issue's 5 s",
        "an earlier version of this README said",
        "when I tried that width",
        "--out .devcarry/cmr_all.npz",
        "continued on this project's 2-core CPU",
        "times on this CPU, idle",
    ]
    for text in examples:
        assert any(p.search(text) for p, _ in PATTERNS), text
    fine = ["upstream MONAI Label issue 1805", "1800 steps", "stop the server", "a 2-core x86 CPU, 24 GiB"]
    for text in fine:
        assert not any(p.search(text) for p, _ in PATTERNS), text


def test_no_development_vocabulary():
    found = offences()
    assert not found, "development vocabulary in the documents or the code:\n" + "\n".join(found)
