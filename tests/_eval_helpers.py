"""Helpers shared by the evaluation tests."""

from __future__ import annotations

import argparse

from pacofr.commands import eval as eval_command


def run_eval(argv: list[str]) -> int:
    """``pacofr eval ...`` through the command module (independent of pacofr.cli's module list)."""
    parser = argparse.ArgumentParser(prog="pacofr")
    eval_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)
