"""``fair-forge-explain audit``: the fairness audit of a dataset from the command line.

    fair-forge-explain audit --input items.jsonl --protected she,he,her,his --group group --counterfactual gender \\
        --method occlusion --out report.html

``--protected`` takes words separated by commas, or ``ATTRIBUTE=words`` (repeat it for several attributes);
``--protected-spans`` reads each item's ``protected_spans`` instead. ``--counterfactual`` names a built-in swap
("gender"), or ``--swap WORD=OTHER`` (repeatable) gives the word pairs to swap. The report is HTML or JSON by
the suffix of ``--out``; the explanations stream to ``<out stem>.records.jsonl`` beside it, which ``--resume``
continues. Arguments are checked before any model loads (bad ones exit with 2).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence, Union

from . import common
from .common import COLUMN_KEYS, PROG, BadInput, Parser, non_negative_int, parse_columns, parse_params
from ..core.types import Granularity

#: --column keys of an audit: an item's own counterfactual is always its ``counterfactual`` field.
AUDIT_COLUMN_KEYS = tuple(key for key in COLUMN_KEYS if key != "counterfactual")


def build_audit_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"{PROG} audit",
                    description="How much does the model lean on protected words across a dataset, per group?")
    parser.add_argument("--input", required=True, metavar="FILE", help="a .jsonl, .csv or .parquet file of items")
    parser.add_argument("--out", required=True, metavar="REPORT", help="the report: .html or .json (by suffix)")
    words = parser.add_mutually_exclusive_group(required=True)
    words.add_argument("--protected", metavar="WORDS", action="append",
                       help="protected words, comma-separated (she,he,her,his), or ATTRIBUTE=words; repeatable")
    words.add_argument("--protected-spans", action="store_true",
                       help="each item names its protected characters in its protected_spans field")
    parser.add_argument("--group", metavar="COLUMN", default=None, help="the column holding each item's group")
    swaps = parser.add_mutually_exclusive_group()
    swaps.add_argument("--counterfactual", metavar="ATTRIBUTE", default=None,
                       help="build x' by swapping this attribute's words (built in: gender)")
    swaps.add_argument("--swap", metavar="WORD=OTHER", action="append", default=[],
                       help="instead, build x' by swapping these word pairs (both ways); repeatable")
    parser.add_argument("--method", metavar="M", default=None, help="attribution method (default: occlusion)")
    parser.add_argument("--contrast", metavar="NAME", default="logprob_diff",
                        help="the contrastive score of rows with a contrast_target: logprob_diff (default), prob_diff")
    parser.add_argument("--granularity", metavar="G", default=Granularity.WORD.value,
                        choices=[g.value for g in Granularity], help="token, word or sentence (default: word)")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--bootstrap", metavar="N", type=non_negative_int, default=1000,
                        help="bootstrap resamples per confidence interval (default: 1000)")
    parser.add_argument("--confidence", metavar="C", type=float, default=0.95,
                        help="confidence level of the intervals (default: 0.95)")
    parser.add_argument("--seed", metavar="N", type=non_negative_int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue the records of an earlier run")
    parser.add_argument("--overwrite", action="store_true", help="replace the records of an earlier run")
    parser.add_argument("--column", metavar="KEY=NAME", action="append", default=[],
                        help=f"the column holding KEY, one of {', '.join(AUDIT_COLUMN_KEYS)}")
    parser.add_argument("--param", metavar="KEY=VALUE", action="append", default=[],
                        help="a method parameter, e.g. --param n_samples=64 (VALUE read as JSON when it parses)")
    return parser


def _protected(values: Optional[Sequence[str]]) -> Union[str, list[str], dict[str, list[str]]]:
    """``--protected`` options as ``audit``'s ``protected``: one list of words, or attribute -> words."""
    if values is None:
        return "spans"
    attributes: dict[str, list[str]] = {}
    for value in values:
        name, sep, words = value.rpartition("=")
        listed = [word.strip() for word in words.split(",") if word.strip()]
        if not listed or (sep and not name.strip()):
            raise BadInput(f"--protected expects words separated by commas or ATTRIBUTE=words, got {value!r}")
        key = name.strip() if sep else "protected"
        if key in attributes:
            raise BadInput(f"--protected names {key!r} twice; give each attribute once")
        attributes[key] = listed
    return attributes["protected"] if list(attributes) == ["protected"] else attributes


def _counterfactual(attribute: Optional[str], pairs: Sequence[str]) -> Union[None, str, list[tuple[str, ...]]]:
    """``--counterfactual`` or ``--swap`` as ``audit``'s ``counterfactual``: an attribute, or word pairs."""
    if not pairs:
        return attribute
    split = [tuple(word.strip() for word in pair.split("=", 1)) for pair in pairs]
    if any(len(pair) != 2 or not all(pair) for pair in split):
        raise BadInput(f"--swap expects WORD=OTHER, got {pairs!r}")
    return split


def run_audit(args: argparse.Namespace) -> int:
    """Check everything that can be checked without the model, then load it, audit, and write the report."""
    from ..runs.audit import audit, check_options

    source = common.source_file(args.input, "--input")
    params = parse_params(args.param)
    columns = parse_columns(args.column, AUDIT_COLUMN_KEYS)
    protected = _protected(args.protected)
    counterfactual = _counterfactual(args.counterfactual, args.swap)
    options = check_options(protected, counterfactual, args.group, args.bootstrap, args.confidence, args.seed,
                            args.out)
    if options.records is not None and options.records.exists() and not (args.resume or args.overwrite):
        raise BadInput(f"{options.records} exists: pass --resume to continue it or --overwrite to replace it")
    common.check_method(args.method)
    common.check_contrast(args.contrast)

    model, tokenizer, model_name = common.load_model(args.model)
    from ..explainer import AttributionExplainer

    explainer = AttributionExplainer(model, tokenizer, model_name=model_name, default_method="occlusion")
    report = audit(explainer, source, protected=protected, group=args.group, method=args.method, contrast=args.contrast,
                   granularity=args.granularity, counterfactual=counterfactual, n_bootstrap=args.bootstrap,
                   confidence=args.confidence, seed=args.seed, out=options.report, overwrite=args.overwrite,
                   **columns, **params)
    print(report.summary().to_string(index=False, float_format=lambda value: f"{value:+.4g}"))
    print(f"{len(report.items)} items, {len(report.failures)} failures; written to {options.report}")
    return 0


SUBCOMMANDS = {"audit": (build_audit_parser, run_audit)}
