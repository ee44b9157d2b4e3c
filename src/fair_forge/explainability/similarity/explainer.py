"""Which token pairs make two texts similar: integrated Jacobians for sentence-transformers models.

``SimilarityExplainer`` wraps (does not subclass or change) a ``SentenceTransformer`` and returns an
``AttributionResult`` whose matrix is query tokens x candidate tokens. ``IntJacobianExplainableTransformer`` is a
drop-in for retrivex 0.1.0's class of the same name (same ``explain`` signature and return tuple).

Cosine similarity is explained by attributing the *normalised* embeddings g = f/|f|, so the reported terms are
cosines and add up: sum A = cos(a, b) - cos(a, r_b) - cos(r_a, b) + cos(r_a, r_b) up to the integration error.
For a model ending in a Normalize module (all-MiniLM-L6-v2) this equals retrivex's rule exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from sentence_transformers import SentenceTransformer

from ..errors import ContextLengthError, InvalidInputError, UnsupportedModelError
from ..methods.quadrature import DEFAULT_TOLERANCE
from ..runtime.architectures import resolve_path
from ..runtime.models import display_name
from ..text.prompt import validate_text
from .jacobian import (
    DEFAULT_MAX_EVALUATIONS,
    IntegratedJacobians,
    Projections,
    attribution_matrix,
    check_budget,
    completeness,
    per_dimension_matrix,
    similarity_terms,
)
from ..core.types import (
    AttributionBatchResult,
    AttributionMatrix,
    AttributionMetadata,
    AttributionMethod,
    AttributionResult,
    Granularity,
    TokenAttribution,
    normalize_scores,
)

SIMILARITIES: tuple[str, ...] = ("cosine", "dot")
MODES: tuple[str, ...] = ("auto", "jvp", "vjp")


@dataclass
class _Text:
    """One tokenized text: the model's batch-1 features, its reference ids, token labels and char spans."""

    text: str
    features: dict[str, Any]
    reference_ids: torch.Tensor
    tokens: list[str]
    spans: list[Optional[tuple[int, int]]]


@dataclass
class _Pair:
    query: _Text
    candidate: _Text
    query_projections: Projections
    candidate_projections: Projections


class SimilarityExplainer:
    """Integrated-Jacobian explanations of a SentenceTransformer's similarity between two texts.

    ``reference_token_id`` replaces every non-special token of a text to build its reference (default: the
    tokenizer's pad token, else its unk token). ``batch_size`` bounds the sequences in one model call.
    """

    def __init__(self, model: SentenceTransformer, *, reference_token_id: Optional[int] = None,
                 batch_size: int = 512) -> None:
        if not isinstance(model, SentenceTransformer) or len(model) == 0:
            raise UnsupportedModelError(f"SimilarityExplainer needs a SentenceTransformer, got {type(model).__name__}")
        trunk = model[0]
        self.tokenizer = getattr(trunk, "tokenizer", None)
        if self.tokenizer is None or not hasattr(trunk, "auto_model"):
            raise UnsupportedModelError("the first module of the SentenceTransformer must be a text Transformer")
        if reference_token_id is None:
            reference_token_id = self.tokenizer.pad_token_id
            if reference_token_id is None:
                reference_token_id = self.tokenizer.unk_token_id
        if reference_token_id is None:
            raise UnsupportedModelError("the tokenizer has neither a pad nor an unk token; pass reference_token_id")
        vocabulary = trunk.auto_model.get_input_embeddings().num_embeddings
        if isinstance(reference_token_id, bool) or not isinstance(reference_token_id, int) \
                or not 0 <= reference_token_id < vocabulary:
            raise InvalidInputError(
                f"reference_token_id must be a token id in [0, {vocabulary}), got {reference_token_id!r}"
            )
        self.model = model
        self.reference_token_id = int(reference_token_id)
        self.batch_size = batch_size

    # -- public API ------------------------------------------------------------------------------------------------

    def explain(self, query: str, candidate: str, *, similarity: str = "cosine", layer_index: int = 0,
                num_interpolation_steps: int = 50, integration: str = "gauss_legendre",
                mode: str = "auto", max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
                tolerance: float = DEFAULT_TOLERANCE) -> AttributionResult:
        """Explain ``similarity(query, candidate)``: a query-token x candidate-token matrix and row sums.

        ``layer_index`` picks the encoder layer whose input is attributed (0: just after the embeddings, where
        special tokens get exactly zero); ``integration`` is 'gauss_legendre' (default), 'midpoint', 'riemann'
        (retrivex's right Riemann sum) or 'adaptive' (refines until each text's completeness error is within
        ``tolerance``, with ``num_interpolation_steps`` as its budget per text; see docs/methods.md);
        ``mode`` 'jvp'/'vjp' forces forward- or reverse-mode, 'auto' picks.
        ``max_evaluations`` bounds the interpolation points over both texts (``BudgetError`` before any work).
        """
        started = time.perf_counter()
        check_budget(num_interpolation_steps, 2, max_evaluations)
        engine = self._engine(similarity, layer_index, num_interpolation_steps, integration, mode,
                              tolerance=tolerance)
        query_text, candidate_text = self._prepare(query, "query"), self._prepare(candidate, "candidate")
        query_projections = engine.project(query_text.features, query_text.reference_ids, mode=mode)
        candidate_projections = engine.project(candidate_text.features, candidate_text.reference_ids, mode=mode)
        pair = _Pair(query_text, candidate_text, query_projections, candidate_projections)
        params = self._params(similarity, layer_index, num_interpolation_steps, integration, mode, tolerance)
        return self._result(pair, params, time.perf_counter() - started)

    def explain_ranking(self, query: str, candidates: Sequence[str], *, similarity: str = "cosine",
                        layer_index: int = 0, num_interpolation_steps: int = 50, integration: str = "gauss_legendre",
                        mode: str = "auto", max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
                        tolerance: float = DEFAULT_TOLERANCE) -> AttributionBatchResult:
        """Explain the query against every candidate, most similar first (``indices`` give candidate positions).

        The query's integrated projections are computed once and reused for every candidate.
        """
        started = time.perf_counter()
        if isinstance(candidates, str) or not isinstance(candidates, Sequence) or len(candidates) == 0:
            raise InvalidInputError("candidates must be a non-empty list of strings")
        check_budget(num_interpolation_steps, 1 + len(candidates), max_evaluations)
        engine = self._engine(similarity, layer_index, num_interpolation_steps, integration, mode,
                              tolerance=tolerance)
        query_text = self._prepare(query, "query")
        candidate_texts = [self._prepare(text, f"candidates[{i}]") for i, text in enumerate(candidates)]
        params = self._params(similarity, layer_index, num_interpolation_steps, integration, mode, tolerance)
        query_projections = engine.project(query_text.features, query_text.reference_ids, mode=mode)
        results = []
        for index, candidate_text in enumerate(candidate_texts):
            item_started = time.perf_counter()
            candidate_projections = engine.project(candidate_text.features, candidate_text.reference_ids, mode=mode)
            pair = _Pair(query_text, candidate_text, query_projections, candidate_projections)
            seconds = time.perf_counter() - item_started + (query_projections.seconds if index == 0 else 0.0)
            results.append((index, self._result(pair, params, seconds, query_reused=index > 0)))
        results.sort(key=lambda item: -item[1].metadata.similarity)
        return AttributionBatchResult(
            results=[result for _, result in results],
            indices=[index for index, _ in results],
            model_name=self._model_name(),
            total_compute_time_seconds=time.perf_counter() - started,
        )

    # -- input handling --------------------------------------------------------------------------------------------

    def _engine(self, similarity: str, layer_index: int, steps: int, integration: str,
                mode: str, encoder_layers_path: Optional[str] = None,
                tolerance: float = DEFAULT_TOLERANCE) -> IntegratedJacobians:
        """Validate the settings (typed errors, before any model call) and build the engine."""
        if similarity not in SIMILARITIES:
            raise InvalidInputError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
        return IntegratedJacobians(
            self.model, layer_index, normalize=similarity == "cosine", integration=integration, steps=steps,
            batch_size=self.batch_size, encoder_layers_path=encoder_layers_path,
            truncate_dim=getattr(self.model, "truncate_dim", None), tolerance=tolerance,
        )

    def _prepare(self, text: str, name: str) -> _Text:
        """Tokenize ``text`` exactly as the model does; reference = special tokens kept, the rest replaced."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{name} must be a non-empty string, got {text!r}")
        validate_text(text, name)
        limit = self.model.max_seq_length
        encoding = self.tokenizer(text, return_special_tokens_mask=True,
                                  return_offsets_mapping=bool(getattr(self.tokenizer, "is_fast", False)))
        if limit is not None and len(encoding["input_ids"]) > limit:
            raise ContextLengthError(
                f"{name} has {len(encoding['input_ids'])} tokens but the model reads at most {limit}; shorten it"
            )
        features = {key: value.to(self.model.device) if torch.is_tensor(value) else value
                    for key, value in self.model.preprocess([text]).items()}
        ids = features["input_ids"][0].tolist()
        if ids == list(encoding["input_ids"]):
            special = list(encoding["special_tokens_mask"])
            offsets = encoding.get("offset_mapping")
        else:  # the model's preprocessing differs (e.g. a prompt): trust its ids, find special tokens by id
            special_ids = set(self.tokenizer.all_special_ids)
            special, offsets = [int(i in special_ids) for i in ids], None
        reference = torch.tensor([[i if s else self.reference_token_id for i, s in zip(ids, special)]],
                                 device=features["input_ids"].device, dtype=features["input_ids"].dtype)
        spans: list[Optional[tuple[int, int]]] = [None] * len(ids)
        if offsets is not None:
            spans = [None if s or end <= start else (int(start), int(end))
                     for (start, end), s in zip(offsets, special)]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return _Text(text, features, reference, tokens, spans)

    # -- output ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _params(similarity: str, layer_index: int, steps: int, integration: str, mode: str,
                tolerance: float) -> dict[str, Any]:
        params = {"similarity": similarity, "layer_index": layer_index, "num_interpolation_steps": steps,
                  "integration": integration, "mode": mode}
        return {**params, "tolerance": tolerance} if integration == "adaptive" else params

    def _model_name(self) -> str:
        return display_name(getattr(self.model[0].auto_model.config, "name_or_path", None), "unknown")

    def _result(self, pair: _Pair, params: dict[str, Any], seconds: float,
                query_reused: bool = False) -> AttributionResult:
        matrix = attribution_matrix(pair.query_projections, pair.candidate_projections).cpu()
        terms = similarity_terms(pair.query_projections, pair.candidate_projections)
        total = float(matrix.sum())
        lhs, error, relative = completeness(terms, total)
        row_sums = matrix.sum(dim=1).tolist()
        normalized = normalize_scores(row_sums)
        attributions = [
            TokenAttribution(text=token, score=score, position=i, normalized_score=norm,
                             start=span[0] if span else None, end=span[1] if span else None, token_positions=[i])
            for i, (token, score, norm, span) in enumerate(zip(pair.query.tokens, row_sums, normalized,
                                                               pair.query.spans))
        ]
        parts = [pair.candidate_projections] + ([] if query_reused else [pair.query_projections])
        counts = {key: sum(p.counts[key] for p in parts) for key in parts[0].counts}
        metadata = AttributionMetadata(
            compute_time_seconds=seconds,
            **counts,  # n_forward_passes, n_backward_passes, n_jvp_passes, n_tokens_processed
            method_params=params,
            convergence_delta=error,
            relative_convergence_delta=relative,
            similarity=terms["query_candidate_similarity"],
            **{name: terms[name] for name in
               ("query_reference_similarity", "candidate_reference_similarity", "references_similarity")},
            completeness_lhs=lhs,
            attribution_sum=total,
            completeness_error=relative,
            query_projection_reused=query_reused,
            timings={"query_seconds": 0.0 if query_reused else pair.query_projections.seconds,
                     "candidate_seconds": pair.candidate_projections.seconds},
            candidate_scores=matrix.sum(dim=0).tolist(),
        )
        return AttributionResult(
            prompt=pair.query.text,
            target=pair.candidate.text,
            method=AttributionMethod.INTEGRATED_JACOBIANS,
            granularity=Granularity.TOKEN,
            attributions=attributions,
            matrix=AttributionMatrix(row_labels=pair.query.tokens, column_labels=pair.candidate.tokens,
                                     values=matrix.tolist(), row_axis="query token", column_axis="candidate token"),
            model_name=self._model_name(),
            metadata=metadata,
        )


class IntJacobianExplainableTransformer(SentenceTransformer):
    """Drop-in for ``retrivex.stransformers.IntJacobianExplainableTransformer`` (0.1.0); ``encode`` is unchanged.

    Differences: the default quadrature is Gauss-Legendre (``integration="riemann"`` gives retrivex's numbers);
    token labels are the model's own tokens (``[SEP]`` where retrivex printed ``[EOS]``); cosine attributes the
    normalised embeddings (identical to retrivex for models that end in a Normalize module).
    """

    def explain(self, query: str, candidate: str, similarity_metric: str = "cosine", return_details: bool = False,
                move_to_cpu: bool = False, show_progress: bool = True, compress_embedding_dimension: bool = True,
                layer_index: int = 0, num_interpolation_steps: int = 250, encoder_layers_path: Optional[str] = None,
                embeddings_layer_path: Optional[str] = None, integration: str = "gauss_legendre",
                max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
                ) -> tuple[torch.Tensor, list[str], list[str], Optional[dict[str, float]]]:
        """``(matrix, query_tokens, candidate_tokens, details or None)`` like retrivex 0.1.0.

        ``matrix`` is (S_q, S_c), or (S_q, H, S_c, H) per hidden dimension with ``compress_embedding_dimension=False``.
        """
        check_budget(num_interpolation_steps, 2, max_evaluations)
        explainer = SimilarityExplainer(self)
        engine = explainer._engine(similarity_metric, layer_index, num_interpolation_steps, integration,
                                   "auto", encoder_layers_path)
        if embeddings_layer_path:
            resolve_path(self[0].auto_model, embeddings_layer_path, "embeddings layer")
        query_text = explainer._prepare(query, "query")
        candidate_text = explainer._prepare(candidate, "candidate")
        progress = _progress_bar if show_progress else None
        full = not compress_embedding_dimension
        projections = [engine.project(t.features, t.reference_ids, mode="auto", full_jacobian=full, progress=progress)
                       for t in (query_text, candidate_text)]
        if move_to_cpu:
            projections = [_to_cpu(p) for p in projections]
        if full:
            matrix = per_dimension_matrix(*projections)
        else:
            matrix = attribution_matrix(*projections)
        details = similarity_terms(*projections) if return_details else None
        return matrix.float().cpu(), query_text.tokens, candidate_text.tokens, details


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="integrated Jacobian", leave=False)


def _to_cpu(projections: Projections) -> Projections:
    jacobian = projections.weighted_jacobian
    return Projections(projections.projections.cpu(), projections.embedding.cpu(),
                       projections.reference_embedding.cpu(), None if jacobian is None else jacobian.cpu(),
                       projections.counts, projections.seconds)
