"""What the project's command lines share: help that names each flag's default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each flag's help ends with its default where it has one
    that is not already said (``(default: 8)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default not in (None, False, [], ())
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text
