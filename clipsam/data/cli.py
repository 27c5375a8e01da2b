"""``clipsam data ...``: generate synthetic data and download the real datasets.

The main ``clipsam`` command hands ``argv`` to :func:`data_main` when ``argv[0] == "data"``::

    clipsam data synth --root data/synth [--seed 0] [--image-size 256] [--layouts mvtec visa]
                       [--categories fabric disk] [--num-train-good 4] [--num-test-good 4]
                       [--num-test-anomalous 8] [--overwrite] [--no-progress]
    clipsam data download {mvtec,visa} --root DIR [--no-progress] [--delete-archive]
"""

from __future__ import annotations

import argparse
import sys

from clipsam.data.download import DATASETS, download_dataset
from clipsam.data.synthetic import LAYOUTS, SYNTH_CATEGORIES, generate_synthetic
from clipsam.errors import ClipSamError

__all__ = ["build_parser", "data_main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``clipsam data`` argument parser."""
    parser = argparse.ArgumentParser(prog="clipsam data", description="Generate or download datasets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{synth,download}")

    synth = commands.add_parser("synth", help="write synthetic industrial data (MVTec-AD and VisA layouts)")
    synth.add_argument("--root", required=True, help="output folder (gets mvtec/ and visa/)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=256)
    synth.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    synth.add_argument("--categories", nargs="+", choices=SYNTH_CATEGORIES, default=None)
    synth.add_argument("--num-train-good", type=int, default=4)
    synth.add_argument("--num-test-good", type=int, default=4)
    synth.add_argument("--num-test-anomalous", type=int, default=8)
    synth.add_argument("--overwrite", action="store_true", help="replace existing layout folders")
    synth.add_argument("--no-progress", action="store_true")

    download = commands.add_parser("download", help="download, verify and extract a real dataset")
    download.add_argument("dataset", choices=sorted(DATASETS))
    download.add_argument("--root", required=True, help="folder to extract into (the archive is kept there)")
    download.add_argument("--delete-archive", action="store_true", help="delete the archive after extraction")
    download.add_argument("--no-progress", action="store_true")
    return parser


def _check_synth_args(args: argparse.Namespace) -> None:
    """Every ``clipsam data synth`` argument, checked before any folder is created.

    Raises:
        ConfigError: naming the option and the valid range; the root is an existing file, on a
            read-only or full disk, or has '~' without a home directory.
    """
    from clipsam.errors import ConfigError
    from clipsam.runs import check_home_paths, check_output_folder

    if args.image_size < 32:
        raise ConfigError(f"--image-size {args.image_size}: synthetic images need at least 32 pixels per side")
    for option in ("num_train_good", "num_test_good", "num_test_anomalous"):
        if getattr(args, option) < 0:
            raise ConfigError(f"--{option.replace('_', '-')} {getattr(args, option)}: image counts must be >= 0")
    if args.num_train_good + args.num_test_good + args.num_test_anomalous == 0:
        raise ConfigError("all image counts are 0: nothing to generate; set --num-test-anomalous etc. above 0")
    check_home_paths({"--root": args.root})
    check_output_folder(args.root, "--root")


def data_main(argv: list[str]) -> int:
    """Run ``clipsam data`` with ``argv`` (without the leading ``"data"``); return the exit code.

    User errors (:class:`~clipsam.errors.ClipSamError`) print one line to stderr and return 2.
    """
    from clipsam.runs import disk_error_message

    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            _check_synth_args(args)
            result = generate_synthetic(
                args.root,
                layouts=args.layouts,
                categories=args.categories,
                image_size=args.image_size,
                num_train_good=args.num_train_good,
                num_test_good=args.num_test_good,
                num_test_anomalous=args.num_test_anomalous,
                seed=args.seed,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            per_cat = args.num_train_good + args.num_test_good + args.num_test_anomalous
            print(
                f"wrote {result['num_files']} files: {len(result['categories'])} categories x {per_cat} images "
                f"({', '.join(result['categories'])}), seed {args.seed}, {args.image_size}px"
            )
            for layout, path in result["layouts"].items():
                print(f"  {layout:5s} {path}")
        else:
            root = download_dataset(
                args.dataset, args.root, progress=not args.no_progress, keep_archive=not args.delete_archive
            )
            print(f"{DATASETS[args.dataset].name} ready in {root} (format: {args.dataset})")
    except (ClipSamError, ValueError) as exc:
        print(f"clipsam: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = disk_error_message(exc)
        if message is None:
            raise
        print(f"clipsam: error: {message}", file=sys.stderr)
        return 2
    return 0
