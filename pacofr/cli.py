"""The ``pacofr`` command line: one sub-command per job.

Each sub-command lives in its own module (listed in ``COMMAND_MODULES``) whose
``add_parser(subparsers)`` registers it and sets ``func``: called with the parsed namespace,
returning an exit code. Modules are imported only to build the parser, so heavy imports belong
inside ``func``.

A command reports bad input and refused actions by raising (see :func:`expected_errors`): the
user sees one line ``error: ...`` on stderr and exit status 2 (1 for a run stopped by a
non-finite loss), never a traceback; ``--verbose`` logs the traceback too. Ctrl-C prints one
line and exits with status 130 (128 + SIGINT), as a shell does. Every ``--help`` shows the
options' defaults.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

COMMAND_MODULES: tuple[str, ...] = (
    "pacofr.commands.prepare",
    "pacofr.commands.show_regions",
    "pacofr.commands.pretrain",
    "pacofr.commands.export",
    "pacofr.commands.eval",
)


def _cmd_info(args: argparse.Namespace) -> int:
    from pacofr.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help text that ends with the option's default, unless it names it already or there is
    none to show (no default, or a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if "default" in text or not action.option_strings or not shown or action.default in ("", [], ()):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    from pacofr import __version__

    parser = argparse.ArgumentParser(prog="pacofr", description="PaCo-FR face pre-training with fused kernels")
    parser.add_argument("--version", action="version", version=f"pacofr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="versions, device, and which backends work here")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-command parser below it :class:`_DefaultsHelpFormatter`."""
    parser.formatter_class = _DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def _log_level(verbose: bool) -> int:
    """DEBUG with ``--verbose``, else INFO; under torchrun, ranks other than 0 log warnings only."""
    if verbose:
        return logging.DEBUG
    return logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, a damaged file or a refused action: reported in one line.

    Every other exception is a bug and keeps its traceback.
    """
    from pacofr.data.detection import MissingDependencyError
    from pacofr.ops import BackendUnavailableError
    from pacofr.train.lock import RunFolderLockedError
    from pacofr.train.stop_signals import TrainingStopped
    from pacofr.train.trainer import NonFiniteLossError

    return (ValueError, OSError, MissingDependencyError, BackendUnavailableError, RunFolderLockedError,
            NonFiniteLossError, TrainingStopped)


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line (line breaks inside the message become spaces)."""
    return "error: " + (re.sub(r"\s*\n\s*", " ", str(err)).strip() or type(err).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacofr`` console script and ``python -m pacofr``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args.verbose),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"error: pacofr {args.command} interrupted (Ctrl-C); what was finished is kept: prepare continues "
              "where it stopped when run again, pretrain from its last checkpoint with --resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, expected_errors()):
            raise
        if args.verbose:
            logger.exception("pacofr %s failed", args.command)
        print(error_line(err), file=sys.stderr)
        return int(getattr(err, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
