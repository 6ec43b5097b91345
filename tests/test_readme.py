"""README.md documents every flag main.py takes, with its current default."""

import os

from config import build_parser
from conftest import ROOT


def test_every_flag_is_in_the_readme_with_its_default():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert f"| `{flag}` | `{action.default}` |" in readme, flag
