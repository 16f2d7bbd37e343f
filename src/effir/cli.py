"""The ``effir`` command: a table of verbs (:data:`effir.stages.VERBS`), each backed by one module under
``effir.stages``.

Each stage module provides ``add_arguments(parser)`` and ``run(args) -> int | None``. Bad input raises
:class:`~effir.utils.EffirError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__
from .stages import VERBS, OneLineParser, describe, run_verb

COMMANDS = VERBS
"""verb -> (stage module, one-line help), in the pipeline's order."""


def build_parser() -> argparse.ArgumentParser:
    """The whole ``effir`` command line: one sub-parser per verb."""
    parser = OneLineParser(prog="effir", description="Make LLM-based dense retrievers small and fast (EffiR).",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"effir {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for verb, (_, help_text) in VERBS.items():
        describe(sub.add_parser(verb, help=help_text), verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    return run_verb(args.verb, args)


if __name__ == "__main__":
    sys.exit(main())
