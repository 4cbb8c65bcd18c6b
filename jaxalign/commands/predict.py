"""`jaxalign predict`: a trained TinyAlign run answers one question about one image (`jaxalign.programs.predict`).

    jaxalign predict --workdir runs/s2 --image cat.png --question "what colour is the cat?"
    jaxalign predict --workdir runs/s2 --image cat.png --question "what colour is the cat?" --json

Prints the answer, then the neighbours retrieved from the run's memory bank (bank id, score, value text), best
first; with `--json` one JSON object {answer, question, image, neighbours: [{id, score, value_id, value}]}.
Exit codes: 0 answered; 2 bad input (a missing or unreadable image, a file that is not an image, an empty
question, a workdir without a trained run), with one error line on stderr naming the file or field.
"""
from __future__ import annotations

import argparse
import json
import sys

_DESCRIPTION = """\
Loads a trained TinyAlign run from its workdir (its saved config, towers, tokenizer, memory bank and latest
checkpoint), asks it one question about one image and prints the answer and the neighbours retrieved from the
memory bank that went into it: bank id, similarity score and the value's text, best first. The question is
prompted as the run's evaluation questions are (an <image> line, then the question, in the run's chat template),
and the answer is generated as `jaxalign eval` generates (retrieval at prefill, greedy decoding with the KV cache).
A run without retrieval (control 'off') answers with no neighbours.

Exit codes: 0 answered; 2 bad input (a missing or unreadable image, a file that is not an image, an empty question,
a workdir without a trained run), with one error line on stderr naming the file or field."""

_EPILOG = """\
The saved config can be adjusted as in `jaxalign eval`, e.g. --config.mesh='(-1, 1, 1)' on another machine.

example:
  jaxalign predict --workdir /tmp/tiny/stage2 --image shape.png --question "what color is the shape?" --json"""


def format_table(prediction) -> str:
    """The human-readable form: the answer, then one row per neighbour (bank id, score, value text)."""
    lines = [f"answer:   {prediction.answer}", f"question: {prediction.question}", f"image:    {prediction.image}"]
    if not prediction.neighbours:
        lines.append("neighbours: none (this run answers without retrieval)")
        return "\n".join(lines)
    id_width = max(len("bank id"), *(len(str(n.id)) for n in prediction.neighbours))
    lines += ["", "neighbours retrieved from the memory bank (best first):",
              f"  {'bank id':>{id_width}}  {'score':>8}  value"]
    for neighbour in prediction.neighbours:
        remapped = "" if neighbour.value_id == neighbour.id else f"  (value of entry {neighbour.value_id})"
        lines.append(f"  {neighbour.id:>{id_width}}  {neighbour.score:>8.4f}  {neighbour.value!r}{remapped}")
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> int:
    """Runs `jaxalign predict`: prints the answer (exit 0) or one error line to stderr (exit 2)."""
    from jaxalign.programs import predict

    try:
        prediction = predict.predict(args.workdir, args.image, args.question, overrides=args.overrides,
                                     max_new_tokens=args.max_new_tokens)
    except predict.PredictError as error:
        print(f"jaxalign predict: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(prediction.to_json()) if args.json else format_table(prediction))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="answer one question about one image with a trained TinyAlign run, showing its neighbours",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, metavar="RUN",
                        help="the workdir of a `jaxalign train` run (config.json, checkpoints/, memory/)")
    parser.add_argument("--image", required=True, metavar="FILE", help="the image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True, metavar="TEXT", help="the question about the image")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {answer, question, image, neighbours: [{id, score, value_id, "
                             "value}]} instead of the table")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="longest answer in tokens (default: the run's config.eval.max_new_tokens)")
    parser.set_defaults(func=predict_command, overrides=[], accepts_config_overrides=True)
