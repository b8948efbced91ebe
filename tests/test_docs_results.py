"""The README's numbers are traceable: every results file it links exists and records the commit and
the SHA-256 of every weights file it used, and every relative link in it resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links() -> list[str]:
    return [u for u in LINK.findall(README.read_text()) if "://" not in u and not u.startswith("mailto:")]


def test_every_relative_link_in_the_readme_resolves():
    missing = [u for u in _links() if not (ROOT / u).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_results_file_the_readme_links_records_its_commit_and_weights():
    results = sorted({u for u in _links() if u.startswith("benchmarks/results/") and u.endswith(".json")})
    assert results, "the README links no results file"
    unstamped = []
    for u in results:
        prov = json.loads((ROOT / u).read_text()).get("provenance") or {}
        weights = prov.get("weights") or {}
        if not prov.get("commit") or not weights or not all(weights.values()) or not prov.get("host"):
            unstamped.append(u)
    assert not unstamped, f"README numbers from results without commit, weights SHA-256 or host: {unstamped}"
