"""The README stays true: its usage block is %%dbllm?'s, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from dbmagic.frontends.magic import DbLLM

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def words(text: str) -> list[str]:
    return text.split()


def test_usage_section_matches_the_magic_help():
    block = re.search(r"<!-- usage.*?-->\n```text\n(.*?)\n```\n<!-- /usage -->", README, re.S)
    assert block, "README lost its usage block"
    help_text = DbLLM.dbllm.parser.format_help().split("\n", 2)[2]  # without the '::' line
    assert words(block.group(1)) == words(help_text), (
        "README usage differs from %%dbllm?: run python scripts/update_readme_usage.py")


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.replace("python3 -m venv .venv && ", "") in ci


def test_committed_notebooks_and_docs_hold_no_token():
    # the local workspace's tokens are "dbmagic-local-<hex>"; a real one would follow "Bearer "
    for path in [*(ROOT / "dbmagic" / "notebooks").glob("*.ipynb"), ROOT / "README.md"]:
        text = path.read_text()
        assert "dbmagic-local-" not in text, path
        assert not re.search(r"Bearer (?!\*\*\*)\w", text), path
        assert not re.search(r"dapi[0-9a-f]{32}", text), path


def test_testing_example_runs_as_written():
    block = re.search(r"## Testing your own code.*?```python\n(.*?)\n```", README, re.S).group(1)
    import dbmagic

    exec(block, {"dbmagic": dbmagic})


def test_the_opening_says_what_the_tests_need_beyond_python_and_pip():
    """On main it said both commands need only Python and pip; the tests also need Chromium and Java 17."""
    opening = (ROOT / "README.md").read_text().split("## Install")[0]
    assert "apt-get install -y chromium" in opening and "Java 17" in opening
    assert "Both need only Python" not in opening
