"""Regenerate the README's usage block from ``%%dbllm?`` (run after changing the magic's options)."""

import os
import re
from pathlib import Path

os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width

from dbmagic.frontends.magic import DbLLM  # noqa: E402

readme = Path(__file__).resolve().parent.parent / "README.md"
usage = DbLLM.dbllm.parser.format_help().split("\n", 2)[2].rstrip()
text = re.sub(r"(<!-- usage.*?-->\n```text\n).*?(\n```\n<!-- /usage -->)",
              lambda m: m.group(1) + usage + m.group(2), readme.read_text(), flags=re.S)
readme.write_text(text)
print(f"Updated the usage block in {readme}")
