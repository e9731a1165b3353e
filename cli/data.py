"""``promptsam data check FOLDER`` (the work is in :mod:`shared_model.data.check`, imported when run)."""

from __future__ import annotations

import argparse

from cli.argtypes import add_command


def cmd_data_check(args: argparse.Namespace) -> int:
    """Print what the folder holds and its problems; exit status 1 when there is a problem."""
    from shared_model.data.check import check_folder, format_check

    result = check_folder(args.folder)
    print(format_check(result))
    return 0 if result.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``promptsam data check`` to the ``promptsam`` subcommands."""
    p = add_command(sub, "data", "check a data folder before training")
    data = p.add_subparsers(dest="data_command", required=True, title="data commands", metavar="COMMAND")
    d = add_command(
        data, "check", "list a data folder's centres, pairs, image sizes, mask values and problems",
        "Read every image/mask pair of a data folder the way training does and print, per centre, the "
        "pairs found, how many are usable, empty masks, image sizes and mask values, then every problem "
        "(unpaired or unsupported files, unreadable images or masks, size mismatches, non-binary masks). "
        "Exit status 1 when there is a problem, 2 when the folder is missing or holds no pair.")
    d.add_argument("folder", help="a dataset root (ROOT/<centre>/images, ROOT/<centre>/masks) "
                                  "or one centre's folder (FOLDER/images, FOLDER/masks)")
    d.set_defaults(func=cmd_data_check)
