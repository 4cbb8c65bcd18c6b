"""`jaxalign hf-verify` and `jaxalign hf-export`: Hugging Face interop from the shell."""
from __future__ import annotations

import argparse
import json
import sys


def _hf_verify(args: argparse.Namespace) -> int:
    from jaxalign.io import hf_folder, hf_verify

    try:
        report = hf_verify.verify(args.path, args.tolerance)
    except hf_folder.CheckpointFormatError as error:
        print(json.dumps({"path": args.path, "ok": False, "error": str(error)}))
        return 2
    print(json.dumps(report.as_dict()))
    if not report.compared:
        print(f"jaxalign hf-verify: {args.path} was NOT checked: {report.problem}",
              file=sys.stderr)
        return hf_verify.NOT_COMPARED_EXIT_STATUS
    return 0 if report.ok else 1


def _hf_export(args: argparse.Namespace) -> int:
    """Round trip through jaxalign: load SOURCE into jaxalign params, export them to DEST; or with --workdir, the
    LM of a trained TinyAlign run (LoRA adapters merged)."""
    from jaxalign.io import hf_folder, hf_lm, hf_vision

    if args.workdir:
        if args.source:
            print(f"jaxalign hf-export: error: give --workdir RUN DEST or SOURCE DEST, not both (got {args.source!r} "
                  "as well)", file=sys.stderr)
            return 2
        from jaxalign.programs import lm_export

        try:
            summary = lm_export.export_run_lm(args.workdir, args.dest, args.overrides)
        except (FileNotFoundError, ValueError) as error:
            print(f"jaxalign hf-export: error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(summary))
        return 0
    if not args.source or args.overrides:
        print("jaxalign hf-export: error: " + ("config overrides apply to --workdir RUN only" if args.overrides
                                                else "give SOURCE DEST, or --workdir RUN DEST"), file=sys.stderr)
        return 2
    model_type = hf_folder.read_config(args.source).get("model_type")
    module = hf_vision if model_type in hf_vision.MODEL_TYPES else hf_lm
    cfg, params = module.load(args.source)
    module.export(args.dest, cfg, params)
    print(json.dumps({"source": args.source, "dest": args.dest, "model_type": model_type}))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
        "hf-verify", help="check that jaxalign loads a Hugging Face folder exactly as transformers does",
        description="Load a local Hugging Face snapshot folder (config.json, *.safetensors) with jaxalign and "
                    "with transformers + torch; run both on the same deterministic input and print one JSON line: "
                    "max_abs_diff of the outputs (hidden states for vision towers, logits for LMs) and, for LMs, "
                    "whether greedy generation of 16 tokens agrees. Exit status 0 when they agree, 1 beyond "
                    "tolerance, 2 for an unreadable folder, 3 when nothing was compared because torch or "
                    "transformers is not installed (max_abs_diff null, ok false, `problem` says what to install: "
                    "pip install torch==2.13.0 first, the CPU build, then transformers).")
    verify.add_argument("path", help="Hugging Face snapshot folder")
    verify.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted max abs difference")
    verify.set_defaults(func=_hf_verify)

    export = subparsers.add_parser(
        "hf-export", help="write a Hugging Face folder: a round trip of one, or the LM of a trained run",
        description="Read SOURCE with jaxalign's importer and write DEST with its exporter (config.json + "
                    "model.safetensors), loadable by transformers. With --workdir RUN instead of SOURCE: the LM of "
                    "a trained TinyAlign run as its latest checkpoint leaves it (a LoRA run's adapters merged into "
                    "the base weights), with the run's tokenizer; --config.a.b=value adjusts the run's saved config "
                    "(e.g. --config.model.lm_folder on another machine).")
    export.add_argument("source", nargs="?", help="Hugging Face snapshot folder (not with --workdir)")
    export.add_argument("dest", help="folder to write")
    export.add_argument("--workdir", metavar="RUN", default="",
                        help="the workdir of a `jaxalign train` run: export its LM instead of SOURCE")
    export.set_defaults(func=_hf_export, overrides=[], accepts_config_overrides=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jaxalign")
    add_commands(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
