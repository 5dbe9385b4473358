"""What every fuzz target shares: the project's modules instrumented for coverage (atheris), and
libFuzzer started over the target's ``test_one_input``.

A target is a script: ``python fuzz/<target>.py [libFuzzer flags] [corpus dirs]``. It catches the
exceptions its code documents for bad input (``ValueError`` and its kin) and lets everything else
escape: an escaped exception, a failed invariant (``assert``), a hang or a crash is a finding.
``fuzz/run.py`` runs them all (CI: a short while each; ``--runs``: the long run).
"""

from __future__ import annotations

import sys

import atheris

PROJECT = ["mmcache", "mmcache_client", "encoder_worker"]
"""Packages whose code libFuzzer sees (branch coverage); import them inside ``instrumented()``."""


def instrumented():
    """A context in which imports of the project's packages are instrumented."""
    return atheris.instrument_imports(include=PROJECT)


def main(test_one_input) -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
