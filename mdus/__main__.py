"""The ``mdus`` command line (``python -m mdus ...`` or ``mdus ...``).

Each command lives in the module of its capability and is registered in ``COMMANDS`` as ``name: (add_arguments,
run)``: ``add_arguments(parser)`` fills the command's argparse parser (sub-actions included) and ``run(args)``
returns the exit status; the first line of ``run``'s docstring is the command's help. To add a command, define the
pair in its module and add one line here.
"""

from __future__ import annotations

import argparse
import sys

from mdus import bench, demo, evaluate, train
from mdus.data import cli as data_cli

COMMANDS = {
    "data": (data_cli.add_arguments, data_cli.run),
    "train": (train.add_arguments, train.run),
    "eval": (evaluate.add_arguments, evaluate.run),
    "demo": (demo.add_arguments, demo.run),
    "bench": (bench.add_arguments, bench.run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdus", description="Multimodal depth up-scaling of text LLMs into "
                                                              "speech LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        help_line = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None
        p = sub.add_parser(name, help=help_line, description=help_line)
        add_arguments(p)
        p.set_defaults(_run=run)
    args = parser.parse_args(argv)
    quiet = getattr(args, "no_progress", False)
    if quiet:  # also the bars of transformers' own loading and saving, for this command
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args._run(args) or 0)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
