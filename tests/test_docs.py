import ast
import re
from pathlib import Path

import pytest

from harden.docs import BEGIN, END, POLICY_REFERENCE_PATH, policy_reference
from harden.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REFERENCE = (ROOT / POLICY_REFERENCE_PATH).read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_policy_reference_is_the_generated_one():
    start, stop = REFERENCE.index(BEGIN), REFERENCE.index(END) + len(END)
    assert REFERENCE[start:stop] + "\n" == policy_reference(), "run: make docs"


def _paths(schema, node, prefix=""):
    props = node.get("properties", {})
    for key, sub in props.items():
        path = f"{prefix}{key}"
        yield path
        target = sub
        if "$ref" in sub:
            target = schema["$defs"][sub["$ref"].split("/")[-1]]
        elif "items" in sub and "$ref" in sub["items"]:
            target = schema["$defs"][sub["items"]["$ref"].split("/")[-1]]
            path += "[]"
        if "properties" in target:
            yield from _paths(schema, target, path + ".")


def test_every_schema_field_is_documented_with_a_meaning():
    schema = Policy.model_json_schema()
    paths = list(_paths(schema, schema))
    assert len(paths) > 40
    for path in paths:
        row = re.search(rf"^\| `{re.escape(path)}` \|.*\| (.+) \|$", REFERENCE, re.M)
        assert row, f"{path} missing from {POLICY_REFERENCE_PATH}"
        assert len(row.group(1).strip()) > 3, f"{path} has no description"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= 250, f"expected README.md of at most 250 lines, got {n}: move the detail into docs/"


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path):
    for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text())):
        target = m.group(1)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            yield target


def test_pages_exist():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    for name in (
        "README.md",
        "objectives.md",
        "verification.md",
        "certificate.md",
        "onnx.md",
        "scaling.md",
        "troubleshooting.md",
        "policies.md",
        "benchmarks.md",
        "development.md",
        "policy-reference.md",
        "design.md",
    ):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = list(_links(page))
    for target in links:
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert dest.suffix == ".md", f"{page.name}: {target}: an anchor into a file that is not Markdown"
            assert anchor in _anchors(dest), f"{page.name}: {target}: no heading with that anchor in {dest.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_refer_to_nothing_outside_the_repository(page):
    text = page.read_text()
    assert not re.search(r"\.\./shared|shared[/]", text), f"{page.name} refers outside the repository"


def test_readme_links_to_the_docs():
    readme_links = {t.partition("#")[0] for t in _links(ROOT / "README.md")}
    for p in PAGES:
        if p.parent.name == "docs" and p.name != "README.md":
            assert f"docs/{p.name}" in readme_links, f"README.md does not link to docs/{p.name}"


def test_docs_module_sits_on_top_without_cli_or_pipeline():
    tree = ast.parse((ROOT / "harden" / "docs.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {m for m in imported if m.startswith(("harden.cli", "harden.pipeline"))}, imported
