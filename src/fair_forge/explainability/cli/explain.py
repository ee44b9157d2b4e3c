"""``fair-forge-explain``: explain one response of a causal LM from the command line.

    fair-forge-explain --prompt "What is the capital of France?" --target "The capital of France is Paris."
    fair-forge-explain --messages chat.json --target "..." --method occlusion --granularity sentence --json out.json

``--prompt`` is sent as one user message through the tokenizer's chat template (``--raw`` sends it as plain text
instead); ``--messages`` reads a JSON list of ``{"role": ..., "content": ...}`` objects (or an object with a
``messages`` list and optionally a ``target``). The default model is the embedded SmolLM2-135M-Instruct; ``--model``
takes a local transformers folder. Without ``--target`` the model's own greedy answer is explained. Bad input exits
with code 2 and one line on stderr; other failures exit with 1. ``dataset`` and ``summarize`` subcommands: see
``cli/dataset.py``; ``audit``: ``cli/audit.py``.

Building the parser imports neither torch nor transformers (``--help`` answers at once); the model and the methods
are imported only when an explanation runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import common
from .common import EXIT_FAILURE, PROG, BadInput, Parser, non_negative_int, parse_params

if TYPE_CHECKING:  # annotations only: importing types at run time would slow --help
    from ..core.types import AttributionResult
from ..core.types import AttributionMethod, Granularity
from ..viz.console import format_table

#: Built-in methods for causal LMs, listed by --help from the enum (importing the methods would import torch).
LM_METHODS = tuple(m.value for m in AttributionMethod if m is not AttributionMethod.INTEGRATED_JACOBIANS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Which words of the input made a language model produce TARGET?",
        epilog=f"methods: {', '.join(LM_METHODS)} (and any registered with register_method)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the user's message (sent through the chat template)")
    source.add_argument(
        "--messages",
        metavar="FILE.json",
        help='a JSON list of {"role": ..., "content": ...} messages, or {"messages": [...], "target": ...}',
    )
    parser.add_argument(
        "--target", metavar="TEXT",
        help="the response to explain (may also come from the JSON file; without it, the model's own answer)",
    )
    parser.add_argument(
        "--method", metavar="M", default=None, help="attribution method (default: integrated_gradients)"
    )
    parser.add_argument(
        "--granularity",
        metavar="G",
        default=Granularity.WORD.value,
        choices=[g.value for g in Granularity],
        help="token, word or sentence (default: word)",
    )
    parser.add_argument(
        "--model", metavar="PATH", default=None,
        help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--json", metavar="OUT", default=None,
        help="also write the full result as JSON to OUT ('-': print only the JSON, no table)",
    )
    parser.add_argument(
        "--top", metavar="K", type=non_negative_int, default=10, help="how many features to print (default: 10)"
    )
    parser.add_argument("--raw", action="store_true", help="explain --prompt as raw text, without the chat template")
    parser.add_argument("--contrast-target", metavar="TEXT", default=None,
                        help="explain why TARGET rather than this answer (e.g. --target Yes --contrast-target No)")
    parser.add_argument("--contrast", metavar="NAME", default="logprob_diff",
                        help="the contrastive score: logprob_diff (default) or prob_diff")
    parser.add_argument("--counterfactual", metavar="TEXT|FILE.json", default=None,
                        help="explain f(x) - f(x') for this x': the counterfactual --prompt, or with --messages a "
                             "JSON file of its messages (same roles); the features are the segments that differ")
    parser.add_argument(
        "--evaluate", action="store_true",
        help="also print how faithful the ranking is (comprehensiveness, sufficiency, deletion/insertion AUC vs random)",
    )
    parser.add_argument(
        "--param",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a method parameter, e.g. --param n_steps=32 (VALUE is read as JSON when it parses, else as text)",
    )
    return parser


def _check_output_path(path: Optional[str]) -> None:
    """Fail before the (slow) computation when the --json file could not be written afterwards."""
    if path is None or path == "-":
        return
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise BadInput(f"--json {path} is a folder; give a file name")
    if not folder.is_dir():
        raise BadInput(f"--json {path}: folder {folder} does not exist")
    writable = os.access(out, os.W_OK) if out.exists() else os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise BadInput(f"--json {path}: permission denied, the result could not be written there")


def _read_messages(path: str) -> tuple[list[Any], Optional[str]]:
    """Messages (and an optional target) from a JSON file; BadInput with the reason if it cannot be used."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInput(f"cannot read messages file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"messages file {path} is not valid JSON: {exc}") from None
    target = None
    if isinstance(data, dict):
        target = data.get("target")
        if target is not None and not isinstance(target, str):
            raise BadInput(f"messages file {path}: 'target' must be a string")
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise BadInput(f'messages file {path} must hold a non-empty list of {{"role": ..., "content": ...}} objects')
    for index, message in enumerate(data):
        fields_ok = isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        if not fields_ok:
            raise BadInput(f'messages file {path}: item {index} is not a {{"role": str, "content": str}} object')
    return data, target


def print_faithfulness(explainer: Any, result: AttributionResult, source: Any) -> None:
    """``--evaluate``: the faithfulness report of ``result`` (mode "remove"), beside the random orders' mean."""
    from ..evaluation import faithfulness

    report = faithfulness(explainer, result, source)
    print(f"\nfaithfulness: top features removed, {report.n_random} random orders for reference, "
          f"{report.n_forward_passes} forward passes; f(input) = {report.full_score:.4f}")
    better = {"comprehensiveness": "higher", "sufficiency": "lower", "deletion_auc": "lower", "insertion_auc": "higher"}
    for name, direction in better.items():
        mean, spread = getattr(report.random_mean, name), getattr(report.random_std, name)
        print(f"  {name:<18} {getattr(report, name):+10.4f}   random {mean:+10.4f} ± {spread:.4f}   "
              f"({direction} is better)")


def run(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    target = args.target
    messages: Optional[list[Any]] = None
    if args.raw and args.prompt is None:
        raise BadInput("--raw applies to --prompt only")
    if args.messages is not None:
        messages, file_target = _read_messages(args.messages)
        target = target if target is not None else file_target
    if target is not None and not target.strip():
        raise BadInput("--target is empty; give the response text to explain")
    if args.prompt is not None and not args.prompt.strip():
        raise BadInput("--prompt is empty; give the user's message")
    common.check_text(args.prompt, "--prompt")
    common.check_text(target, "--target")
    for index, message in enumerate(messages or []):
        common.check_text(message["content"], f"message {index} of {args.messages}")
    common.check_text(args.contrast_target, "--contrast-target")
    counterfactual: Any = args.counterfactual
    if counterfactual is not None:
        if messages is not None:
            counterfactual, _ = _read_messages(counterfactual)
        elif not counterfactual.strip():
            raise BadInput("--counterfactual is empty; give x', the input with the words changed")
        common.check_text(args.counterfactual, "--counterfactual")
    _check_output_path(args.json)
    common.check_method(args.method)
    common.check_contrast(args.contrast)

    model, tokenizer, model_name = common.load_model(args.model)
    from ..explainer import AttributionExplainer

    explainer = AttributionExplainer(model, tokenizer, model_name=model_name)
    request: dict[str, Any] = {"target": target, "granularity": args.granularity, "contrast_target": args.contrast_target,
                               "contrast": args.contrast, **params}
    if args.method is not None:
        request["method"] = args.method
    if messages is not None:
        request["messages"] = messages
        request["counterfactual"] = counterfactual
    elif args.raw or not getattr(tokenizer, "chat_template", None):
        request.update(prompt=args.prompt, counterfactual=counterfactual)
    else:
        request["messages"] = [{"role": "user", "content": args.prompt}]
        if counterfactual is not None:
            request["counterfactual"] = [{"role": "user", "content": counterfactual}]
    result = explainer.explain(**request)

    if args.json == "-":
        print(result.model_dump_json(indent=2))
        return 0
    print(format_table(result, args.top))
    if args.evaluate:
        print_faithfulness(explainer, result, request.get("messages", request.get("prompt")))
    if args.json is not None:
        try:
            Path(args.json).write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"{PROG}: error: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"\nfull result written to {args.json}")
    return 0
