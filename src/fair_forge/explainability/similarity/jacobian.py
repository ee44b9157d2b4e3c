"""Integrated Jacobians for siamese encoders (Moeller, Nikolaev, Pado; EMNLP 2023, EACL 2024).

With g the encoder read from the input of encoder layer k to the (optionally normalised) sentence embedding, a and
r_a the layer-k hidden states of a text and of its reference (special tokens kept, every other token replaced by
padding), and x(alpha) = r_a + alpha (a - r_a), the *integrated projection* of token i is

    P_a[i] = integral_0^1 J_g(x(alpha)) (a - r_a)_i dalpha          (one vector in embedding space per token)

so that sum_i P_a[i] = g(a) - g(r_a) exactly, and the attribution matrix A = P_a P_b^T satisfies
sum_ij A_ij = (g(a) - g(r_a)) . (g(b) - g(r_b)) = g(a).g(b) - g(a).g(r_b) - g(r_a).g(b) + g(r_a).g(r_b).

P is computed with forward-mode JVPs: one tangent per token (a - r_a masked to that token), vmapped over the
tokens so the primal pass is shared, all interpolation points batched. That is S tangents instead of the D
backward passes of the reference implementation. The per-hidden-dimension tensor needs the full integrated
Jacobian, which is computed with batched backward passes (D cotangents).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
from torch import nn

from ..core.plans import drive
from ..errors import BudgetError, InvalidInputError
from ..runtime.architectures import encoder_layers
from ..runtime.models import borrowed
from ..methods.quadrature import DEFAULT_TOLERANCE, integrate, warn_if_unconverged

Integration = Literal["gauss_legendre", "midpoint", "riemann", "adaptive"]
FIXED_RULES: tuple[str, ...] = ("gauss_legendre", "midpoint", "riemann")
INTEGRATION_RULES: tuple[str, ...] = FIXED_RULES + ("adaptive",)

# Where the list of encoder layers lives, relative to the Hugging Face model, per architecture family.


# Interpolation points (model rows) one call may evaluate, over all its texts; ``max_evaluations`` overrides it.
DEFAULT_MAX_EVALUATIONS = 10_000


def check_budget(steps: int, n_texts: int, max_evaluations: int) -> None:
    """``BudgetError`` before anything is allocated when ``steps`` points for each of ``n_texts`` texts is too many."""
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise InvalidInputError(f"max_evaluations must be a positive integer, got {max_evaluations!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"num_interpolation_steps must be a positive integer, got {steps!r}")
    if steps * n_texts > max_evaluations:
        raise BudgetError(
            f"{steps} interpolation steps for {n_texts} texts are {steps * n_texts} model evaluations, more than "
            f"max_evaluations={max_evaluations}; lower num_interpolation_steps or raise max_evaluations"
        )


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``steps`` nodes in (0, 1] and their weights (float64) for integrating over alpha in [0, 1].

    ``gauss_legendre`` is exact for polynomials of degree 2*steps - 1; ``midpoint`` uses (k - 1/2)/steps;
    ``riemann`` is the right Riemann sum k/steps, k = 1..steps, the rule of retrivex 0.1.0.
    """
    if rule not in FIXED_RULES:
        raise InvalidInputError(f"integration must be one of {FIXED_RULES}, got {rule!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"num_interpolation_steps must be a positive integer, got {steps!r}")
    if rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1.0) / 2.0), torch.from_numpy(weights / 2.0)
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    alphas = (k - 0.5) / steps if rule == "midpoint" else k / steps
    return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


@dataclass(eq=False)
class Projections:
    """One text's integrated projections and what they cost.

    ``projections`` (S, D) float64: P[i]; ``embedding``/``reference_embedding`` (D,) float64: g(a), g(r_a);
    ``weighted_jacobian`` (D, S, H): the integrated Jacobian times (a - r_a), only when asked for.
    """

    projections: torch.Tensor
    embedding: torch.Tensor
    reference_embedding: torch.Tensor
    weighted_jacobian: Optional[torch.Tensor] = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


ProgressFactory = Callable[[int], Any]

# Measured on all-MiniLM-L6-v2 (CPU, 50 steps): one vmapped JVP tangent costs about as much as two
# batched backward passes (cotangents); "auto" mode compares S_active * JVP_COST with the output dimension D.
JVP_COST = 2.0


class IntegratedJacobians:
    """Integrated projections of texts through a SentenceTransformer, read at the input of encoder layer k.

    The model is borrowed: hooks live only inside one call and are removed in ``finally``; modes and
    ``requires_grad`` flags are restored. ``batch_size`` bounds the sequences evaluated in one model call
    (interpolation points x tangents, or x cotangents). ``integration="adaptive"`` integrates each text with the
    adaptive rule of ``methods.quadrature`` (forward mode only) until the completeness error of its projections onto
    g(a) - g(r_a) is within ``tolerance``, with ``steps`` as the budget of interpolation points per text.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_index: int,
        *,
        normalize: bool,
        integration: str = "gauss_legendre",
        steps: int = 50,
        batch_size: int = 512,
        encoder_layers_path: Optional[str] = None,
        truncate_dim: Optional[int] = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self.model = model
        self.adaptive = integration == "adaptive"
        if self.adaptive:
            integrate(1.0, tolerance=tolerance, max_steps=steps)  # typed errors for the settings, nothing run
            self.alphas = self.weights = torch.zeros(0, dtype=torch.float64)
        else:
            self.alphas, self.weights = quadrature(integration, steps)
        self.steps, self.tolerance = steps, tolerance
        layers = encoder_layers(model[0].auto_model, encoder_layers_path)
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < len(layers):
            raise InvalidInputError(f"layer_index must be an integer in [0, {len(layers)}), got {layer_index!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.layer = layers[layer_index]
        self.normalize = normalize
        self.batch_size = batch_size
        self.truncate_dim = truncate_dim

    # -- the encoder as a function of the layer-k hidden states ---------------------------------------------------

    def _encode(self, features: dict[str, Any], replacement: Optional[torch.Tensor] = None,
                captured: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Sentence embeddings; the layer-k input is recorded in ``captured`` and/or swapped for ``replacement``.

        With a replacement of batch B the layers before k still run on the batch-1 ``features`` (computed once);
        per-sequence tensors are broadcast to B for the modules after the transformer.
        """

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if captured is not None:
                captured.append(hidden)
            if replacement is None:
                return None
            if args:
                return (replacement,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replacement}

        handle = self.layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = self.model[0](dict(features))
        finally:
            handle.remove()
        if replacement is not None:
            rows = replacement.shape[0]
            out = {
                key: value.expand(rows, *value.shape[1:])
                if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == 1 and key != "token_embeddings"
                else value
                for key, value in out.items()
            }
        for module in list(self.model)[1:]:
            out = module(out)
        embedding = out["sentence_embedding"]
        if self.truncate_dim is not None:
            embedding = embedding[..., : self.truncate_dim]
        if self.normalize:
            embedding = torch.nn.functional.normalize(embedding, dim=-1)
        return embedding

    # -- public entry point ----------------------------------------------------------------------------------------

    def project(self, features: dict[str, Any], reference_ids: torch.Tensor, *, mode: str = "auto",
                full_jacobian: bool = False, progress: Optional[ProgressFactory] = None) -> Projections:
        """Integrated projections of one text (``features``: batch-1 model inputs; ``reference_ids``: (1, S)).

        ``mode="jvp"``: forward-mode, one tangent per token whose difference is non-zero. ``mode="vjp"``: batched
        backward passes, one per embedding dimension; needed (and used) when ``full_jacobian`` is asked for.
        ``mode="auto"`` takes whichever needs fewer passes, counting a tangent as JVP_COST backward passes.
        """
        if mode not in ("auto", "jvp", "vjp"):
            raise InvalidInputError(f"mode must be 'auto', 'jvp' or 'vjp', got {mode!r}")
        if self.adaptive and (mode == "vjp" or full_jacobian):
            raise InvalidInputError("integration='adaptive' runs in forward mode: use mode='jvp' or 'auto' and no "
                                    "per-dimension attributions, or a fixed integration rule")
        started = time.perf_counter()
        with borrowed(self.model):
            pair = {
                key: torch.cat([value, reference_ids.to(value.device)]) if key == "input_ids"
                else value.expand(2, *value.shape[1:]) if torch.is_tensor(value) and value.ndim > 0 else value
                for key, value in features.items()
            }
            captured: list[torch.Tensor] = []
            with torch.no_grad():
                ends = self._encode(pair, captured=captured)
            hidden = captured[0].detach()
            difference = hidden[0] - hidden[1]
            counts = {"n_forward_passes": 2, "n_backward_passes": 0, "n_jvp_passes": 0}
            if mode == "auto":
                active = int((difference.abs().amax(-1) > 0).sum())
                mode = "jvp" if JVP_COST * active <= ends.shape[-1] else "vjp"
            if self.adaptive:
                weighted = None
                projections = self._adaptive_projections(features, hidden[1], difference,
                                                         (ends[0] - ends[1]).double(), counts)
            elif mode == "vjp" or full_jacobian:
                jacobian = self._integrated_jacobian(features, hidden[1], difference, ends.shape[-1], counts, progress)
                weighted = jacobian * difference.to(jacobian.dtype)
                projections = weighted.sum(-1).T.contiguous()
            else:
                weighted = None
                projections = self._jvp_projections(features, hidden[1], difference, ends.shape[-1], counts, progress)
        counts["n_tokens_processed"] = counts["n_forward_passes"] * difference.shape[0]
        return Projections(
            projections=projections,
            embedding=ends[0].double(),
            reference_embedding=ends[1].double(),
            weighted_jacobian=weighted if full_jacobian else None,
            counts=counts,
            seconds=time.perf_counter() - started,
        )

    def _points(self, reference: torch.Tensor, difference: torch.Tensor, chunk: slice,
                alphas: Optional[torch.Tensor] = None) -> torch.Tensor:
        alphas = (self.alphas if alphas is None else alphas)[chunk].to(device=reference.device, dtype=reference.dtype)
        return reference.unsqueeze(0) + alphas.view(-1, 1, 1) * difference.unsqueeze(0)

    def _chunks(self, steps: int, per_point: int, progress: Optional[ProgressFactory] = None) -> Iterator[slice]:
        size = max(1, min(steps, self.batch_size // max(1, per_point)))
        starts = range(0, steps, size)
        bar = progress(len(starts)) if progress is not None else None
        for start in starts:
            yield slice(start, min(start + size, steps))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _adaptive_projections(self, features: dict[str, Any], reference: torch.Tensor, difference: torch.Tensor,
                              change: torch.Tensor, counts: dict[str, int]) -> torch.Tensor:
        """(S, D) float64 P by the adaptive rule, its completeness measured along ``change`` = g(a) - g(r_a).

        Each round's points go through the model in chunks of ``batch_size`` rows; the rule keeps only weighted sums.
        """
        size = float(change.norm())
        direction = change / size if size else change
        rule = integrate(size, tolerance=self.tolerance, max_steps=self.steps)
        active = int((difference.abs().amax(-1) > 0).sum())

        def integrand(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            points = torch.from_numpy(alphas)
            rows = [self._jvp_at(features, reference, difference, points[chunk], change.shape[-1], counts)
                    for chunk in self._chunks(len(points), active)]
            per_point = torch.cat(rows)  # (k, S, D)
            return (per_point.sum(1) @ direction).cpu().numpy(), per_point.cpu().numpy()

        integral = drive(rule, integrand)
        warn_if_unconverged(integral, self.tolerance, "integrated Jacobians")
        return torch.from_numpy(integral.value).to(difference.device)

    def _jvp_at(self, features: dict[str, Any], reference: torch.Tensor, difference: torch.Tensor,
                alphas: torch.Tensor, out_dim: int, counts: dict[str, int]) -> torch.Tensor:
        """(k, S, D) float64: d g / d alpha split by token at the path points ``alphas``, in one model call.

        Forward-mode JVPs, one tangent per token that differs from its reference, vmapped so the primal pass is
        shared; tokens equal to their reference get exact zeros. (Forward-mode AD needs the math attention kernel.)
        """
        active = torch.nonzero(difference.abs().amax(-1) > 0).flatten()
        rows = len(alphas)
        full = torch.zeros((rows, difference.shape[0], out_dim), dtype=torch.float64, device=difference.device)
        if len(active) == 0:
            return full
        tangents = torch.zeros((len(active),) + tuple(difference.shape), dtype=difference.dtype,
                               device=difference.device)
        tangents[torch.arange(len(active)), active] = difference[active]
        encode = lambda x: self._encode(features, replacement=x)  # noqa: E731
        points = self._points(reference, difference, slice(None), alphas)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
            tangent = tangents.unsqueeze(1).expand(-1, rows, -1, -1)
            jvps = torch.func.vmap(lambda t: torch.func.jvp(encode, (points,), (t,))[1])(tangent)  # (T, k, D)
        counts["n_forward_passes"] += rows
        counts["n_jvp_passes"] += rows * len(active)
        full[:, active] = jvps.double().transpose(0, 1)
        return full

    def _jvp_projections(self, features: dict[str, Any], reference: torch.Tensor, difference: torch.Tensor,
                         out_dim: int, counts: dict[str, int], progress: Optional[ProgressFactory]) -> torch.Tensor:
        """(S, D) float64: P[i] for every token i by the fixed rule, accumulated chunk by chunk."""
        full = torch.zeros((difference.shape[0], out_dim), dtype=torch.float64, device=difference.device)
        active = int((difference.abs().amax(-1) > 0).sum())
        for chunk in self._chunks(len(self.alphas), active, progress):
            per_point = self._jvp_at(features, reference, difference, self.alphas[chunk], out_dim, counts)
            full += torch.einsum("n,nsd->sd", self.weights[chunk].to(full.device), per_point)
        return full

    def _integrated_jacobian(self, features: dict[str, Any], reference: torch.Tensor, difference: torch.Tensor,
                             out_dim: int, counts: dict[str, int],
                             progress: Optional[ProgressFactory]) -> torch.Tensor:
        """(D, S, H) float64: sum_n w_n dg/dx at x(alpha_n), by batched backward passes over D cotangents."""
        jacobian = torch.zeros((out_dim,) + tuple(difference.shape), dtype=torch.float64, device=difference.device)
        eye = torch.eye(out_dim, dtype=difference.dtype, device=difference.device)
        for chunk in self._chunks(len(self.alphas), out_dim, progress):
            points = self._points(reference, difference, chunk).requires_grad_(True)
            rows = points.shape[0]
            with torch.enable_grad():
                embeddings = self._encode(features, replacement=points)
            weights = self.weights[chunk].to(points.device)
            per_call = max(1, self.batch_size // rows)
            for start in range(0, out_dim, per_call):
                stop = min(start + per_call, out_dim)
                cotangents = eye[start:stop].unsqueeze(1).expand(-1, rows, -1)
                (grads,) = torch.autograd.grad(embeddings, points, cotangents, is_grads_batched=True,
                                               retain_graph=stop < out_dim)
                jacobian[start:stop] += torch.einsum("n,dnsh->dsh", weights, grads.double())
            counts["n_forward_passes"] += rows
            counts["n_backward_passes"] += rows * out_dim
        return jacobian


def attribution_matrix(query: Projections, candidate: Projections) -> torch.Tensor:
    """A = P_query P_candidate^T, (S_query, S_candidate) float64."""
    return query.projections @ candidate.projections.T


def per_dimension_matrix(query: Projections, candidate: Projections) -> torch.Tensor:
    """(S_query, H, S_candidate, H): A split over hidden dimensions, built without any (S*H)^2 intermediate."""
    if query.weighted_jacobian is None or candidate.weighted_jacobian is None:
        raise ValueError("per-dimension attributions need projections computed with full_jacobian=True")
    return torch.einsum("dih,djk->ihjk", query.weighted_jacobian, candidate.weighted_jacobian)


def similarity_terms(query: Projections, candidate: Projections) -> dict[str, float]:
    """The four dot products of the completeness identity (cosines when the embeddings were normalised)."""
    a, r_a = query.embedding, query.reference_embedding
    b, r_b = candidate.embedding, candidate.reference_embedding
    return {
        "query_candidate_similarity": float(a @ b),
        "query_reference_similarity": float(a @ r_b),
        "candidate_reference_similarity": float(b @ r_a),
        "references_similarity": float(r_a @ r_b),
    }


def completeness(terms: dict[str, float], total: float) -> tuple[float, float, float]:
    """(left-hand side, |lhs - total|, that relative to |lhs|) of the completeness identity."""
    lhs = (terms["query_candidate_similarity"] - terms["query_reference_similarity"]
           - terms["candidate_reference_similarity"] + terms["references_similarity"])
    error = abs(lhs - total)
    relative = error / abs(lhs) if lhs != 0.0 else (0.0 if error == 0.0 else math.inf)
    return lhs, error, relative
