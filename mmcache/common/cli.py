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


ROUTER_ELASTIC_DEFAULTS = {"interval": 1.0, "high": 0.5, "low": 0.5, "cooldown": 5.0, "sustain": 2}
"""The router's ``--elastic-*`` defaults (``llm_worker.elastic.policy.ElasticPolicy``, which a
test holds this to), for the help of ``mmcache up``, which may not import the workers."""


def add_elastic_tuning(parser: argparse.ArgumentParser, defaults: dict, *, passed_on: bool = False) -> None:
    """The ``--elastic-*`` tuning flags of the router and of ``mmcache up``, one set of texts.
    ``defaults`` (keys as in ``ROUTER_ELASTIC_DEFAULTS``) become the flags' defaults; with
    ``passed_on`` (``mmcache up``) they are named in the help only, and an unset flag is None: the
    stack passes only what was given, and the router's own defaults hold."""
    flags = {
        "interval": (float, "S", "seconds between the router's polls of the workers' load"),
        "high": (float, "S", "a stage whose mean queue delay passes S seconds wants a worker"),
        "low": (float, "F", "a stage may give a worker while its busy fraction spread over one worker fewer stays "
                            "under F and its queue delay under half of --elastic-high"),
        "cooldown": (float, "S", "seconds after a switch ends before the next may start"),
        "sustain": (int, "N", "polls in a row a stage must stay hot (and a donor idle) before a switch"),
    }
    for name, (kind, metavar, text) in flags.items():
        parser.add_argument(f"--elastic-{name}", type=kind, metavar=metavar,
                            default=None if passed_on else defaults[name],
                            help=f"with --elastic: {text} (default: {defaults[name]})")
