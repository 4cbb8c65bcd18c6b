"""`jaxalign prepare-data`: write the tfds data sets training reads, once, split over processes, resumable
(`jaxalign.programs.prepare_data`).

    jaxalign prepare-data llava --json DIR/questions.json --images DIR/images --data-dir OUT [--name NAME]
    jaxalign prepare-data easy-vqa [--data-dir OUT]
    jaxalign prepare-data clutrr --train DIR/1.2,1.3_train.csv --test DIR --data-dir OUT [--name NAME]
    jaxalign prepare-data --config jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava \\
        --config.data.manual_dir=DIR --config.data.data_dir=OUT

Prints, per data set, where it is, the shards written (or that it was there already), its skip report by split
and the config overrides that train on it; `--format json` prints one JSON object instead. Exit codes: 0 prepared (or
already there); 2 bad input (a missing file, a config without data), with one error line naming it.
"""
from __future__ import annotations

import argparse
import json
import sys

_DESCRIPTION = """\
Turns a LLaVA-format JSON file and its image folder, the easy-vqa package, or CLUTRR CSV files into the tfds
(array_record) data set that training reads, once, before training: `jaxalign train` with the same data directory
then only reads it. The records and their order are those of the in-training build.

Run it under a launcher to split the work (launch/local.sh N 1 jaxalign prepare-data ...): every process writes
its share of the shards into the one data directory (which every process must see), process 0 finishes. An
interrupted preparation resumes, on rerunning the same command, without redoing its finished shards, and is never
taken for a finished data set. Samples left out (missing or corrupt images, empty conversations, malformed CSV
rows) are counted by reason with their ids, printed, and saved as prepare_report.json in the data set's folder."""

_EPILOG = """\
examples:
  jaxalign prepare-data llava --json data/questions.json --images data/images --data-dir data/tfds --workers 4
  jaxalign prepare-data --config jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava \\
      --config.data.manual_dir=data --config.data.data_dir=data/tfds
  jaxalign train --config jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava --workdir runs/s2 \\
      --config.data.manual_dir=data --config.data.data_dir=data/tfds
  jaxalign prepare-data clutrr --train clutrr/1.2,1.3_train.csv --test clutrr --data-dir data/tfds
  jaxalign clutrr train-teacher --config jaxalign/configs/clutrr_teacher.py --workdir runs/teacher \\
      --config.data.prepared_dir=data/tfds/jaxalign_clutrr/files/1.1.0"""


def prepare_command(args: argparse.Namespace) -> int:
    """Runs `jaxalign prepare-data`: prints what was prepared (exit 0) or one error line (exit 2)."""
    if args.kind is None and not args.config:
        print("jaxalign prepare-data: error: name what to prepare (llava, easy-vqa or clutrr) or give --config FILE",
              file=sys.stderr)
        return 2
    if args.overrides and not args.config:
        print(f"jaxalign prepare-data: error: {args.overrides[0]} overrides a config, but no --config was given",
              file=sys.stderr)
        return 2
    from jaxalign.programs import prepare_data

    options = prepare_data.shard_options(workers=args.workers, examples_per_shard=args.examples_per_shard)
    try:
        if args.config:
            from jaxalign.configs.base import load_config

            config = load_config(args.config, args.overrides)
            if args.fail_fast and "fail_fast" in config.data:
                config.data.fail_fast = True
            prepared = prepare_data.prepare_from_config(
                config, data_dir=args.data_dir,
                clutrr_name=args.name or prepare_data.DEFAULT_CLUTRR_NAME, check_images=args.check_images, **options)
        elif args.kind == "llava":
            prepared = [prepare_data.prepare_llava(args.json_file, args.data_dir, args.images, args.name,
                                                   check_images=args.check_images, fail_fast=args.fail_fast,
                                                   **options)]
        elif args.kind == "easy-vqa":
            prepared = prepare_data.prepare_easy_vqa(args.data_dir, args.configs, **options)
        else:
            prepared = [prepare_data.prepare_clutrr(args.train, args.test, args.data_dir,
                                                    args.name or prepare_data.DEFAULT_CLUTRR_NAME,
                                                    skip_bad=not args.fail_fast, **options)]
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"jaxalign prepare-data: error: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"datasets": [item.to_json() for item in prepared]}, indent=1, default=str))
    else:
        print("\n".join(item.describe() for item in prepared))
    return 0


def _add_shared(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options of every form. On the sub-commands their defaults are suppressed, so that an option given before
    the sub-command name is not reset by the sub-command's default."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--workers", type=int, default=default(1), metavar="N",
                        help="threads per process writing shards (image reading and decoding; default 1)")
    parser.add_argument("--examples-per-shard", type=int, default=default(1024), metavar="N",
                        help="samples per shard: the unit of resumption and of the split over processes "
                             "(default 1024)")
    parser.add_argument("--format", choices=("text", "json"), default=default("text"),
                        help="text: the report per data set (default); json: one JSON object {datasets: [...]}")
    parser.add_argument("--no-check-images", dest="check_images", action="store_false", default=default(True),
                        help="LLaVA: only check that each image file exists (default: decode every image once)")
    parser.add_argument("--fail-fast", action="store_true", default=default(False),
                        help="stop at the first bad sample or row instead of skipping and reporting it")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data", help="write the tfds data set training reads, once (split over processes, resumable)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="prepare every data set this training config reads (its --config.a.b=value overrides "
                             "may follow), e.g. jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava")
    parser.add_argument("--data-dir", default=None, metavar="OUT",
                        help="tfds data directory (with --config: replaces config.data.data_dir)")
    parser.add_argument("--name", default=None, help="with --config of a CLUTRR config: the tfds config name")
    _add_shared(parser, suppress=False)
    parser.set_defaults(func=prepare_command, overrides=[], accepts_config_overrides=True, kind=None)
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")

    llava = kinds.add_parser(
        "llava", help="a LLaVA-format JSON file and its image folder",
        description="Writes jaxalign_llava/NAME from a JSON list of {id, image, conversations} samples. Train on "
                    "it with config.data.manual_dir = the JSON's folder, train_json / train_name / image_root as "
                    "printed.")
    llava.add_argument("--json", dest="json_file", required=True, metavar="FILE", help="the LLaVA-format JSON file")
    llava.add_argument("--images", default=None, metavar="DIR",
                       help="folder the samples' image paths are relative to (default: the JSON file's folder)")
    llava.add_argument("--data-dir", required=True, metavar="OUT", help="tfds data directory to write")
    llava.add_argument("--name", default=argparse.SUPPRESS,
                       help="tfds config name (config.data.train_name; default: the JSON file's stem)")
    _add_shared(llava, suppress=True)

    easy = kinds.add_parser(
        "easy-vqa", help="easy-vqa from the installed package (questions and captions, train and test)",
        description="Writes jaxalign_easy_vqa/questions and /captions from the installed easy-vqa package.")
    easy.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="OUT",
                      help="tfds data directory (default: $JAXALIGN_DATA_DIR, else ~/.cache/jaxalign/tfds, where "
                           "training looks when config.data.data_dir is empty)")
    easy.add_argument("--configs", nargs="+", choices=("questions", "captions"), default=("questions", "captions"),
                      help="which configs (default both)")
    _add_shared(easy, suppress=True)

    clutrr = kinds.add_parser(
        "clutrr", help="CLUTRR CSV files (released or generated)",
        description="Writes jaxalign_clutrr/NAME from a training CSV and test CSVs, zips or folders (every "
                    "*_test.csv in them), splits 'train' and 'test_<task>_<k>'; malformed rows are skipped and "
                    "counted (--fail-fast: the first one stops it).")
    clutrr.add_argument("--train", required=True, metavar="CSV",
                        help="training file: a CSV, or data.zip:1.2,1.3_train.csv (config.data.train)")
    clutrr.add_argument("--test", nargs="+", default=(), metavar="CSV",
                        help="test CSV files, zips or folders (config.data.test)")
    clutrr.add_argument("--data-dir", required=True, metavar="OUT", help="tfds data directory to write")
    clutrr.add_argument("--name", default=argparse.SUPPRESS, help="tfds config name (default 'files')")
    _add_shared(clutrr, suppress=True)
