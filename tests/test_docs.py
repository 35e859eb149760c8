"""The README and docs/: the published tables equal common/published.csv, links resolve, the front page stays short."""
import re
import shutil

import pytest

from conftest import REPO
from common import report
from test_report import finished, write_run

PAGES = sorted((REPO / "docs").glob("*.md"))
FILES = [REPO / "README.md", *PAGES]


def without_code(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path):
    """The anchors of a markdown file's headings, as GitHub makes them (repeats get -1, -2, ...)."""
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.+)$", without_code(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_method_has_a_page_with_its_published_tables():
    published = report.read_published()
    methods = {p["method"] for p in published}
    found = {}
    for page in PAGES:
        for match in report.BLOCK.finditer(page.read_text()):
            found[match[2]] = page.name
            # with no run folders, as the file holds it: a change to published.csv must be written into the docs
            assert match[3] == report.docs_block(match[2], published), \
                f"{page.name}: run python -m common.report --published --write_docs docs"
    assert set(found) == methods
    assert {p.stem for p in PAGES} == {"selftuning", "debiaspl", "metric_transfer", "usl", "metasemi"}


def test_write_docs_rewrites_only_the_blocks(tmp_path, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    page = docs / "debiaspl.md"
    text = page.read_text()
    start, end = text.index("<!-- published:debiaspl -->\n"), text.index("<!-- /published -->")
    page.write_text(text[:start] + "<!-- published:debiaspl -->\nstale table\n" + text[end:])
    before = {p.name: p.read_text() for p in docs.glob("*.md")}
    report.main(["--published", "--write_docs", str(docs)])
    assert "debiaspl.md: 1 block rewritten" in capsys.readouterr().out
    assert page.read_text() == text
    assert {p.name: p.read_text() for p in docs.glob("*.md") if p != page} == \
        {k: v for k, v in before.items() if k != page.name}
    # with runs: the blocks change, the text around them does not
    runs = tmp_path / "runs"
    flags = {"root": "data/cifar10", "dataset": "cifar10", "num_labeled": 250, "backbone": "wrn28_2", "tau": 0.0,
             "seed": 0}
    write_run(runs / "fixmatch-cifar10-250-s0", "debiaspl", flags, *finished(94.25, 94.0, 94.5, 60.0))
    report.main(["--published", "--write_docs", str(docs), str(runs)])
    changed = page.read_text()
    assert "| FixMatch (FixMatch paper) | 86.19 ± 3.37 | 94.93 ± 0.65 | 250: 94.25 (n=1) |" in changed
    assert report.BLOCK.sub("", changed) == report.BLOCK.sub("", text)


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    # the commands CI runs on a fresh machine
    assert "\npython3 -m venv .venv && .venv/bin/pip install -r requirements.txt && " in text
    assert "\n.venv/bin/python -m pytest -q\n" in text
    for page in PAGES:
        assert f"](docs/{page.name}" in text, f"the README does not link to docs/{page.name}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor:
            assert dest.suffix == ".md" and anchor in anchors(dest), f"{path.name}: link to {target}: no such heading"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_reference_to_documents_outside_the_repository(path):
    # every markdown file a page names is one of the repository's own
    ours = {q.name for q in REPO.rglob("*.md") if ".venv" not in q.parts}
    named = set(re.findall(r"[\w.-]+\.md\b", path.read_text()))
    assert named <= ours, f"{path.name} names {sorted(named - ours)}, not in the repository"


def test_each_page_links_back_to_the_readme():
    for page in PAGES:
        assert "](../README.md)" in page.read_text().split("\n## ")[0], page.name
