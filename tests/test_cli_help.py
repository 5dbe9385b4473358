"""Every flag of every command says what it does, and its default where it has one."""

from __future__ import annotations

import argparse

import pytest

import encoder_worker.cli
import llm_worker.cli
import mmcache.cli


def _subparsers(main, monkeypatch) -> dict[str, argparse.ArgumentParser]:
    seen: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main([])
    top = seen[0]
    return {cmd: p for a in top._actions if isinstance(a, argparse._SubParsersAction) for cmd, p in a.choices.items()}


@pytest.mark.parametrize("main", [mmcache.cli.main, encoder_worker.cli.main, llm_worker.cli.main],
                         ids=["mmcache", "mmcache-encoder", "mmcache-llm"])
def test_every_flag_has_help_with_its_default(main, monkeypatch):
    commands = _subparsers(main, monkeypatch)
    assert commands
    missing = []
    for cmd, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action) % {"default": action.default} if action.help else ""
            has_default = action.default not in (None, False, [], ()) and action.default is not argparse.SUPPRESS
            if not text or (has_default and "default" not in text):
                missing.append(f"{cmd} {action.option_strings[0]}: {text!r}")
    assert not missing, "\n".join(missing)
