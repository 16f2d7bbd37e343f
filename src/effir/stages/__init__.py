"""The verbs of the ``effir`` command: one module per verb, each with ``add_arguments(parser)`` and
``run(args) -> int | None``.

This package is the table of verbs and the way to parse and run one; :mod:`effir.cli` builds the command from it,
and ``effir run`` runs stages through it. Bad input raises :class:`~effir.utils.EffirError`, which
:func:`run_verb` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from types import ModuleType

from ..stage_specs import SPECS
from ..utils import EffirError

VERBS: dict[str, tuple[str, str]] = {verb: (spec.module, spec.help) for verb, spec in SPECS.items()}
"""verb -> (stage module, one-line help), in the pipeline's order (declared in :data:`effir.stage_specs.SPECS`)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (plus exit code 2) instead of the usage block; ``options`` lists the
    actions added to it or to its argument groups, in order."""

    def __init__(self, *args, **kwargs):
        self.options: list[argparse.Action] = []  # before argparse adds -h
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_record(*a, **kw) -> argparse.Action:
            action = add(*a, **kw)
            self.options.append(action)
            return action

        group.add_argument = add_and_record
        return group

    def flags(self) -> set[str]:
        """Every option string this parser accepts (``--output``, ``-h``, ...)."""
        return {s for action in self.options for s in action.option_strings}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class RaisingParser(OneLineParser):
    """argparse whose usage errors raise :class:`EffirError`: for checking option values that did not come from the
    command line (``effir run`` parses every stage's options from the config before the first stage runs)."""

    def error(self, message):
        raise EffirError(message)


def stage_module(verb: str) -> ModuleType:
    """The module behind ``verb``."""
    return importlib.import_module(VERBS[verb][0])


def describe(parser: argparse.ArgumentParser, verb: str) -> None:
    """Give ``parser`` the description and options of ``verb``, and ``verb`` as its ``verb`` default."""
    stage = stage_module(verb)
    parser.description = (stage.__doc__ or VERBS[verb][1]).strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    stage.add_arguments(parser)
    parser.set_defaults(verb=verb)


def verb_parser(verb: str, parser_class: type[OneLineParser] = OneLineParser) -> OneLineParser:
    """The parser of ``effir VERB`` on its own."""
    parser = parser_class(prog=f"effir {verb}")
    describe(parser, verb)
    return parser


@functools.cache
def takes_overwrite(verb: str) -> bool:
    """Whether ``verb`` has ``--overwrite``: such a stage refuses an existing output without it, so ``effir run``
    passes it when a stage must run again. Read from the parser itself, so it cannot drift from the options."""
    return "--overwrite" in verb_parser(verb).flags()


def run_verb(verb: str, args: argparse.Namespace) -> int:
    """Run ``verb`` on parsed ``args``: its exit code; bad input is one line on stderr and exit code 2."""
    try:
        return int(stage_module(verb).run(args) or 0)
    except EffirError as e:
        print(f"effir {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effir {verb}: interrupted", file=sys.stderr)
        return 130


def main_verb(verb: str, argv: list[str]) -> int:
    """``effir VERB ARGV...``: parse ``argv`` with the verb's parser and run it."""
    return run_verb(verb, verb_parser(verb).parse_args(argv))
