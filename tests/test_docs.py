"""Every citation of docs/*.md in the code, configs and README points at a section or heading that exists, and
nothing outside tests/ reads or cites ../shared (a user's clone has only the repository)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# Files that may cite docs/: code, configs, build files, notebooks and the markdown pages themselves.
CITING_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".ipynb", ".cfg", ".sh", ".txt"}
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".ipynb", ".cfg", ".sh"}


def repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what a commit would carry)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    files = [REPO / p for p in out if p]
    return [f for f in files if f.is_file() and (f.suffix in CITING_SUFFIXES or f.name in ("Makefile", "run"))]


def flat_text(path: Path) -> str:
    """The file's text with comment continuations joined, so a citation wrapped over two comment lines reads as
    one ('docs/paper.md\\n    # section 6' -> 'docs/paper.md section 6')."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return re.sub(r"\s*\n\s*(?:#+\s*)?", " ", text)


# ---- the docs themselves ---------------------------------------------------------------------------------------

def sections(md: Path) -> dict[str, str]:
    """'## N. Title' sections of a page: number -> text of the section (heading included)."""
    text = md.read_text(encoding="utf-8")
    parts = re.split(r"^(?=## )", text, flags=re.M)
    out = {}
    for part in parts:
        m = re.match(r"## (\d+)\. ", part)
        if m:
            out[m.group(1)] = part
    return out


def headings(md: Path) -> set[str]:
    """Every heading of a page, and each heading with a trailing '(...)' removed: 'ViT-Adapter (per size)' can be
    cited as "ViT-Adapter (per size)" or "ViT-Adapter"."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6} (.+?)\s*$", line)
        if m:
            h = m.group(1)
            out.add(h)
            out.add(re.sub(r"\s*\([^)]*\)$", "", h))
    return out


def expand(numbers: str) -> list[str]:
    """'2, 3 and 8' -> ['2', '3', '8']; '2-3' -> ['2', '3']."""
    out = []
    for tok in re.findall(r"\d+(?:-\d+)?", numbers):
        if "-" in tok:
            a, b = map(int, tok.split("-"))
            out += [str(i) for i in range(a, b + 1)]
        else:
            out.append(tok)
    return out


# docs/paper.md section 6 | sections 2, 3 and 8 | sections 2-3 | section 8's ... [, Table 5] [, "phrase"]
PAPER_CITE = re.compile(
    r"docs/paper\.md,?\s+sections?\s+(?P<nums>\d{1,2}(?:-\d{1,2})?(?!\d)(?:\s*(?:,|and)\s*\d{1,2}(?:-\d{1,2})?(?!\d))*)"
    r"(?:(?:'s)?,?\s+(?:Table\s+(?P<table>[0-9A-E]+)\b|\"(?P<phrase>[^\"]+)\"))?")
HEADING_CITE = re.compile(r"docs/(?P<page>[a-z_]+)\.md,?\s*\"(?P<heading>[^\"]+)\"")
ANY_CITE = re.compile(r"docs/(?P<page>[A-Za-z_]+)\.md")


def citations() -> list[tuple[str, str]]:
    """(file, citation text) for every mention of docs/<page>.md in the repository."""
    out = []
    for f in repo_files():
        if f.name == "test_docs.py":  # this file's patterns and examples are not citations
            continue
        text = flat_text(f)
        for m in ANY_CITE.finditer(text):
            out.append((str(f.relative_to(REPO)), text[m.start():m.start() + 200]))
    return out


def test_docs_pages_exist_with_their_numbering():
    for page in ("README", "paper", "tables", "baseline", "design"):
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
    # paper.md keeps the numbering the code cites: sections 1 to 8, in order, each once.
    text = (DOCS / "paper.md").read_text(encoding="utf-8")
    assert re.findall(r"^## (\d+)\. ", text, flags=re.M) == [str(i) for i in range(1, 9)]


def test_every_cited_doc_section_and_heading_exists():
    cites = citations()
    # the code does cite the docs: a regex that matched nothing would make this test vacuous
    assert sum(c.startswith("docs/paper.md section") for _, c in cites) > 50
    paper = sections(DOCS / "paper.md")
    heads = {p.stem: headings(p) for p in DOCS.glob("*.md")}
    bad = []
    for where, cite in cites:
        page = ANY_CITE.match(cite).group("page")
        if not (DOCS / f"{page}.md").is_file():
            bad.append(f"{where}: {cite[:60]!r} cites docs/{page}.md, which does not exist")
            continue
        h = HEADING_CITE.match(cite)
        if h and page != "paper":
            if h.group("heading") not in heads[page]:
                bad.append(f"{where}: docs/{page}.md has no heading {h.group('heading')!r}")
            continue
        if page != "paper":
            continue
        p = PAPER_CITE.match(cite)
        if not p:
            bad.append(f"{where}: {cite[:60]!r} cites docs/paper.md without a section number")
            continue
        nums = expand(p.group("nums"))
        missing = [n for n in nums if n not in paper]
        if missing:
            bad.append(f"{where}: docs/paper.md has no section {', '.join(missing)} ({cite[:60]!r})")
            continue
        cited_text = " ".join(paper[n] for n in nums)
        if p.group("table") and not re.search(rf"Table {p.group('table')}\b", cited_text):
            bad.append(f"{where}: Table {p.group('table')} is not in docs/paper.md section(s) {p.group('nums')}")
        if p.group("phrase") and p.group("phrase").lower() not in cited_text.lower():
            bad.append(f"{where}: {p.group('phrase')!r} is not in docs/paper.md section(s) {p.group('nums')}")
    assert not bad, "\n".join(bad)


def test_citation_parser_rejects_what_does_not_exist(tmp_path):
    """The checks above would catch a wrong number, a wrong table, a wrong heading."""
    paper = sections(DOCS / "paper.md")
    assert "9" not in paper and "0" not in paper
    assert expand(PAPER_CITE.match("docs/paper.md sections 2, 3 and 8").group("nums")) == ["2", "3", "8"]
    assert expand(PAPER_CITE.match("docs/paper.md sections 2-3").group("nums")) == ["2", "3"]
    assert expand(PAPER_CITE.match("docs/paper.md section 3, 1280 crops").group("nums")) == ["3"]  # a size
    m = PAPER_CITE.match("docs/paper.md sections 4 and 6, Table 6 (x)")
    assert expand(m.group("nums")) == ["4", "6"] and m.group("table") == "6"
    assert not re.search(r"Table 6\b", paper["7"])  # a citation 'section 7, Table 6' would be reported
    assert "Not a heading" not in headings(DOCS / "baseline.md")
    assert "ViT-Adapter" in headings(DOCS / "baseline.md")  # "ViT-Adapter (per size)" without its parenthesis
    src = tmp_path / "x.py"
    src.write_text("# see docs/paper.md\n#   section 6: wrapped\n")
    assert PAPER_CITE.match(flat_text(src)[flat_text(src).index("docs/"):]).group("nums") == "6"


def test_nothing_outside_tests_reads_or_cites_shared():
    """The project reads nothing from ../shared except the sample data in tests (tests/conftest.py); the facts
    the code cites live in docs/. Markdown outside docs/ may say where the tests look for sample data."""
    bad = []
    pattern = re.compile(r"\.\./shared|[\"']shared[\"']\s*[,/)]|/\s*[\"']shared[\"']|shared/spec")
    for f in repo_files():
        rel = f.relative_to(REPO)
        if rel.parts[0] == "tests":
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        is_code = f.suffix in CODE_SUFFIXES or f.name in ("Makefile", "run")
        for i, line in enumerate(text.splitlines(), 1):
            if ("shared/spec" in line) or (is_code or rel.parts[0] == "docs") and pattern.search(line):
                bad.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not bad, "outside tests/, these read or cite ../shared:\n" + "\n".join(bad)
