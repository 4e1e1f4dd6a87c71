"""The documentation: the site builds in strict mode, every Python snippet of docs/ and README.md runs as written (on
the bundled model, offline) unless a marker before it says why it cannot, README.md stays short with no section
twice, and no paragraph is written in two places."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
README_MAX_LINES = 220
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.DOTALL | re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
OPT_OUT = re.compile(r"<!-- snippet: not run \(([^)]+)\) -->")
# Runs a page's blocks in order in one namespace, as a reader would, and names the block that failed.
RUNNER = """
import json, sys, traceback
sys.path.remove("")  # maft from the installed checkout, not through the folder's link (kernels are cached by source path)
namespace = {"__name__": "__main__"}
for number, code in json.load(sys.stdin):
    try:
        exec(compile(code, f"<python block {number}>", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"python block {number} failed")
"""


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """Each ```python block of a page with the reason it is not run, from a marker on the line before it (None: run)."""
    blocks = []
    for match in PYTHON_BLOCK.finditer(text):
        line_before = text[: match.start()].rstrip("\n").rpartition("\n")[2].strip()
        opt_out = OPT_OUT.fullmatch(line_before)
        blocks.append((match.group(1), opt_out.group(1) if opt_out else None))
    return blocks


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


def test_the_site_builds_strictly_with_its_api_reference(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav or an API reference to an object
    that does not exist is a warning, and a warning fails the build."""
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-6000:]
    reference = (site / "api" / "modeling" / "index.html").read_text()
    assert "get_text_embeddings" in reference and "class_queries_logits" in reference  # rendered from the docstrings
    assert (site / "model_cards" / "maft-mini-example.png").is_file()  # the pages' pictures come along


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page.read_text())], ids=page_id)
def test_the_python_snippets_run_as_written(page, tmp_path):
    """From a folder that sees the checkout's `maft/` (the bundled model and scenes) as the repository's root does,
    in a fresh Python, offline; files the snippets write stay in that folder."""
    blocks = python_blocks(page.read_text())
    to_run = [(number, code) for number, (code, reason) in enumerate(blocks, 1) if reason is None]
    if not to_run:
        pytest.skip("every block of this page needs what the tests do not have (see its markers)")
    for name in ("maft", "model_cards"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    process = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(to_run), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-6000:]


def test_every_snippet_marker_stands_before_a_python_block_and_gives_a_reason():
    for page in PAGES:
        text = page.read_text()
        markers = re.findall(r"^<!-- snippet\b.*$", prose(text), re.MULTILINE)
        assert all(OPT_OUT.fullmatch(marker.strip()) for marker in markers), (page_id(page), markers)
        opted_out = [reason for _, reason in python_blocks(text) if reason is not None]
        assert len(opted_out) == len(markers), f"{page_id(page)}: a marker that is not right before a ```python block"


def test_the_readme_is_short_and_has_no_section_twice():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    headings = re.findall(r"^#+ .*$", prose(text), re.MULTILINE)
    assert len(headings) == len(set(headings)), sorted(heading for heading in headings if headings.count(heading) > 1)


def test_no_paragraph_is_written_twice_in_the_readme_and_the_docs():
    """Each fact has one place: a paragraph of prose (two lines or more) appears once across README.md and docs/."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for paragraph in re.split(r"\n\s*\n", prose(page.read_text())):
            paragraph = " ".join(paragraph.split())
            if paragraph.count(" ") < 20 or paragraph.startswith("|"):
                continue
            assert paragraph not in seen, f"{page_id(page)} repeats a paragraph of {seen[paragraph]}: {paragraph[:120]}"
            seen[paragraph] = page_id(page)


def test_the_readme_links_to_files_that_exist():
    """Relative links (into docs/, model_cards/) work on GitHub, where no site is published yet."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"", prose(README.read_text()))
    targets = [link or source for link, source in links if not (link or source).startswith(("http://", "https://"))]
    assert any(target.startswith("docs/") for target in targets)
    missing = [target for target in targets if not (REPO_ROOT / target).exists()]
    assert not missing
