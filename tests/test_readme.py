import re
from pathlib import Path

from harden.docs import BEGIN, END, policy_reference
from harden.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_policy_reference_is_the_generated_one():
    start, stop = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:stop] + "\n" == policy_reference(), "run: make docs"


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
        row = re.search(rf"^\| `{re.escape(path)}` \|.*\| (.+) \|$", README, re.M)
        assert row, f"{path} missing from the README policy reference"
        assert len(row.group(1).strip()) > 3, f"{path} has no description"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
