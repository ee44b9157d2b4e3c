"""``fair-forge-explain dataset`` and ``fair-forge-explain summarize``: whole datasets from the command line.

    fair-forge-explain dataset qa.jsonl --out results.parquet --method occlusion --generate --column question=q
    fair-forge-explain summarize results.parquet --top 20

Arguments are checked before any model loads (bad ones exit with 2); a run that finishes exits with 0 even when
some items failed: they are recorded in the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common
from .common import COLUMN_KEYS, PROG, BadInput, Parser, non_negative_int, parse_columns, parse_params
from ..core.types import Granularity


def build_dataset_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"{PROG} dataset",
                     description="Explain every item of a dataset into a JSONL or Parquet file.")
    parser.add_argument("input", metavar="INPUT", help="a .jsonl, .csv or .parquet file of items")
    parser.add_argument("--out", required=True, metavar="OUT", help="output .jsonl or .parquet (format by suffix)")
    parser.add_argument("--method", metavar="M", default=None,
                        help="attribution method (default: integrated_gradients)")
    parser.add_argument("--granularity", metavar="G", default=Granularity.WORD.value,
                        choices=[g.value for g in Granularity], help="token, word or sentence (default: word)")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--generate", action="store_true", help="explain the model's own answers, not the dataset's")
    parser.add_argument("--max-new-tokens", metavar="N", type=non_negative_int, default=64,
                        help="longest generated answer, in tokens (default: 64)")
    parser.add_argument("--resume", action="store_true",
                        help="continue into an existing OUT written with the same settings")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    parser.add_argument("--workers", metavar="N", type=non_negative_int, default=2, help="Ray actors (default: 2)")
    parser.add_argument("--limit", metavar="N", type=non_negative_int, default=None, help="only the first N items")
    parser.add_argument("--column", metavar="KEY=NAME", action="append", default=[],
                        help=f"the column holding KEY, one of {', '.join(COLUMN_KEYS)} (e.g. --column question=q)")
    parser.add_argument("--contrast", metavar="NAME", default="logprob_diff",
                        help="the contrastive score of rows with a contrast_target: logprob_diff (default) or prob_diff")
    parser.add_argument("--param", metavar="KEY=VALUE", action="append", default=[],
                        help="a method parameter, e.g. --param n_steps=16 (VALUE read as JSON when it parses)")
    return parser


def build_summarize_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"{PROG} summarize", description="Print the per-feature summary of a dataset output.")
    parser.add_argument("output", metavar="OUT", help="a .jsonl or .parquet output of `dataset`")
    parser.add_argument("--top", metavar="K", type=non_negative_int, default=20, help="rows to print (default: 20)")
    parser.add_argument("--min-count", metavar="N", type=non_negative_int, default=1,
                        help="only features seen at least N times (default: 1)")
    return parser


def run_dataset(args: argparse.Namespace) -> int:
    """Check everything that can be checked without the model, then load it and stream the dataset."""
    from ..runs.sinks import output_format

    params = parse_params(args.param)
    columns = parse_columns(args.column)
    source, out = common.source_file(args.input, "INPUT"), Path(args.out)
    output_format(out)
    if out.exists() and not (args.resume or args.overwrite):
        raise BadInput(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    if args.engine == "ray":
        from ..runs.ray_engine import check_ray

        check_ray()
    if args.workers < 1 or args.max_new_tokens < 1:
        raise BadInput("--workers and --max-new-tokens must be >= 1")
    common.check_method(args.method)
    common.check_contrast(args.contrast)

    model, tokenizer, model_name = common.load_model(args.model)
    from ..runs.datasets import explain_dataset
    from ..explainer import AttributionExplainer

    explainer = AttributionExplainer(model, tokenizer, model_name=model_name)
    engine: dict[str, Any] = {"engine": args.engine}
    if args.engine == "ray":
        engine.update(num_workers=args.workers, model_loader=args.model)
    run = explain_dataset(
        explainer, source, out, method=args.method, granularity=args.granularity, generate=args.generate,
        max_new_tokens=args.max_new_tokens, limit=args.limit, resume=args.resume, overwrite=args.overwrite,
        contrast=args.contrast, **engine, **columns, **params,
    )
    print(f"{run.n_explained} explained, {run.n_failed} failed, {run.n_skipped} already done; "
          f"{run.seconds:.1f} s; written to {run.path}")
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    from ..runs.summary import summarize

    path = Path(args.output)
    if not path.exists():
        raise BadInput(f"no output at {path}")
    if args.min_count < 1:
        raise BadInput("--min-count must be >= 1")
    table = summarize(path, top=args.top, min_count=args.min_count)
    print(table.to_string(index=False, float_format=lambda value: f"{value:+.4f}"))
    return 0


# name -> (parser, runner); ``cli.main`` dispatches on the first argument
SUBCOMMANDS = {"dataset": (build_dataset_parser, run_dataset), "summarize": (build_summarize_parser, run_summarize)}
