"""The paper's loss-proxy estimator: MI as the increase of a predictor's held-out loss when inputs are masked.

Following Covert et al. (SAGE), I(X;Y) ~ E[l(f(0), Y)] - E[l(f(X), Y)] for a predictor f trained with a proper
loss. For a layer (method spec 4.3): a small MLP g predicts the target from the layer's kept units (standardised, so
masking a unit = setting it to zero = its mean); for a candidate unit, mask it, warm-start from g, re-fit briefly
with early stopping on a validation split, and compare its held-out (test split) loss with that of a control
re-fit of g with nothing masked, trained on the same minibatches (so extra training is not mistaken for a loss
change). This is repeated R times with
different splits and seeds; the unit carries information when the loss increase is positive with the requested
confidence (one-sided one-sample t-test over the R increases, scipy).

Models train on MSE (continuous targets) or cross-entropy (integer class labels), with early stopping on the mean
validation loss. Held-out losses are reported in nats: cross-entropy, or for continuous targets the Gaussian
negative log-likelihood of the residuals r with their full second-moment matrix, 1/2 log det E[r r^T], so the
increase is 1/2 log det(E[r_m r_m^T]) - 1/2 log det(E[r_c r_c^T]): the Gaussian CMI when residuals are Gaussian,
invariant to the target's scale, and counting information shared by several target dimensions once (a sum of
per-dimension log-MSE ratios would count it once per dimension).

All masked variants of one query are trained together as one batched MLP (weights of shape (models, ...), inputs
masked through the first layer's rows), so scoring every unit of a layer costs one batched training per repeat.
Everything is seeded with torch.Generators: the same inputs give the same results. This is the faithful-but-slow
mode; the Gaussian estimator is the fast default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import (
    CMIEstimator,
    LayerSession,
    TestResult,
    as_matrix,
    as_units,
    check_confidence,
    check_same_n,
    decide,
)
from .registry import register_estimator

Params = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------- batched MLP
def init_params(n_models: int, d_in: int, hidden: int, d_out: int, gen: torch.Generator) -> Params:
    """Uniform(+-1/sqrt(fan_in)) initialisation of `n_models` independent one-hidden-layer MLPs."""

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    return {
        "w1": uniform((n_models, d_in, hidden), d_in),
        "b1": uniform((n_models, 1, hidden), d_in),
        "w2": uniform((n_models, hidden, d_out), hidden),
        "b2": uniform((n_models, 1, d_out), hidden),
    }


def repeat_params(params: Params, n_models: int) -> Params:
    """Copies of a single model (leading dim 1) as n_models models."""
    return {k: v.expand(n_models, *v.shape[1:]).clone() for k, v in params.items()}


def select_params(params: Params, index: int) -> Params:
    return {k: v[index : index + 1].clone() for k, v in params.items()}


def forward(params: Params, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Outputs (models, n, d_out) of every model on the shared inputs x (n, d_in), masked per model (models, d_in)."""
    w1 = params["w1"] * masks[:, :, None]  # a masked input is a zeroed row of the first layer
    hidden = torch.relu(torch.einsum("nd,mdh->mnh", x, w1) + params["b1"])
    return torch.bmm(hidden, params["w2"]) + params["b2"]


def per_dim_loss(out: torch.Tensor, y: torch.Tensor, classification: bool) -> torch.Tensor:
    """(models, d_out) mean squared error per output dimension, or (models, 1) mean cross-entropy."""
    if classification:
        logp = torch.log_softmax(out, dim=-1)
        target = y[None, :, None].expand(out.shape[0], -1, 1)
        return -logp.gather(-1, target).squeeze(-1).mean(1, keepdim=True)
    return ((out - y[None]) ** 2).mean(1)


def val_score(losses: torch.Tensor) -> torch.Tensor:
    """Per-model validation score for early stopping: the mean loss over output dimensions."""
    return losses.mean(-1)


def gaussian_nll(residuals: torch.Tensor, ridge: float = 1e-6, models_per_chunk: int = 64) -> torch.Tensor:
    """Per-model held-out Gaussian negative log-likelihood in nats (constants dropped): 1/2 log det E[r r^T].

    residuals (models, n, d). The full second-moment matrix, not the per-dimension MSEs, so information shared by
    several target dimensions counts once; with it, the loss increase of a masked input is the Gaussian CMI.
    """
    out = []
    for start in range(0, residuals.shape[0], models_per_chunk):
        r = residuals[start : start + models_per_chunk].double()
        second = r.transpose(1, 2) @ r / r.shape[1]
        second = second + ridge * torch.eye(r.shape[2], dtype=torch.float64)
        L, info = torch.linalg.cholesky_ex(second)
        if bool((info != 0).any()):  # rank deficiency beyond the ridge: fall back to eigenvalues
            logdet = torch.log(torch.linalg.eigvalsh(second).clamp_min(ridge)).sum(-1)
        else:
            logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        out.append(0.5 * logdet)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------- the problem
@dataclass
class FitConfig:
    hidden: int = 32
    max_epochs: int = 100
    refit_epochs: int = 50
    patience: int = 10
    lr: float = 1e-2
    batch_size: int = 128


class ProxyProblem:
    """Standardised inputs and targets with R train/validation/test splits, and the fitting routines."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classification: bool, repeats: int, seed: int,
                 val_fraction: float, test_fraction: float, config: FitConfig):
        self.x = standardise(x).float()
        self.classification = classification
        self.y = y.long() if classification else standardise(y).float()
        self.d_out = int(self.y.max()) + 1 if classification else self.y.shape[1]
        self.config, self.seed = config, seed
        n = x.shape[0]
        n_test, n_val = max(1, int(round(n * test_fraction))), max(1, int(round(n * val_fraction)))
        if n < 10 or n - n_test - n_val < 2:
            raise ValueError(f"{n} samples are too few for train/validation/test splits; pass at least 10")
        self.splits = []
        for r in range(repeats):
            perm = torch.randperm(n, generator=self.generator(2, r))
            self.splits.append((perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]))

    def generator(self, *key: int) -> torch.Generator:
        """A generator seeded from (seed, *key), stable across runs and Python versions."""
        entropy = [self.seed % 2**32] + [k % 2**32 for k in key]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))

    def fresh(self, n_models: int, *key: int) -> Params:
        return init_params(n_models, self.x.shape[1], self.config.hidden, self.d_out, self.generator(0, *key))

    def losses(self, params: Params, masks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return per_dim_loss(forward(params, self.x[idx], masks), self.y[idx], self.classification)

    def test_nats(self, params: Params, masks: torch.Tensor, repeat: int) -> torch.Tensor:
        """(models,) held-out loss in nats: cross-entropy, or the Gaussian NLL of the residuals (`gaussian_nll`)."""
        idx = self.splits[repeat][2]
        with torch.no_grad():
            out = forward(params, self.x[idx], masks)
            if self.classification:
                return per_dim_loss(out, self.y[idx], True)[:, 0].double()
            return gaussian_nll(out - self.y[idx][None])

    def constant_nats(self, repeat: int) -> float:
        """Held-out loss of the best constant predictor (all inputs masked) fitted on the training split."""
        train, _, test = self.splits[repeat]
        if self.classification:
            counts = torch.bincount(self.y[train], minlength=self.d_out).double() + 1.0
            logp = torch.log(counts / counts.sum())
            return float(-logp[self.y[test]].mean())
        return float(gaussian_nll((self.y[test] - self.y[train].mean(0))[None])[0])

    def fit(self, params: Params, masks: torch.Tensor, repeat: int, epochs: int, key: tuple) -> Params:
        """Adam on every model at once; keeps each model's best validation state (early stopping with patience)."""
        cfg = self.config
        train, val, _ = self.splits[repeat]
        params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        best = {k: v.detach().clone() for k, v in params.items()}
        best_val = val_score(self.losses(params, masks, val))
        stale = torch.zeros_like(best_val, dtype=torch.long)
        gen = self.generator(1, repeat, *key)
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=gen)]
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                loss = per_dim_loss(forward(params, self.x[idx], masks), self.y[idx], self.classification)
                opt.zero_grad(set_to_none=True)
                loss.mean(-1).sum().backward()
                opt.step()
            current = val_score(self.losses(params, masks, val))
            better = current < best_val - 1e-6
            for k, v in params.items():
                best[k][better] = v.detach()[better]
            best_val = torch.where(better, current, best_val)
            stale = torch.where(better, torch.zeros_like(stale), stale + 1)
            if bool((stale >= cfg.patience).all()):
                break
        return best


def standardise(a: torch.Tensor) -> torch.Tensor:
    std = a.std(0, unbiased=False)
    return (a - a.mean(0)) / torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.ones_like(std))


def one_sided_p(increases: np.ndarray) -> float:
    """p-value of a one-sided one-sample t-test that the mean increase is > 0."""
    increases = np.asarray(increases, dtype=np.float64)
    spread = increases.std(ddof=1)
    if not np.isfinite(spread) or spread <= 1e-12 * max(1.0, abs(increases.mean())):
        return 0.0 if increases.mean() > 0 else 1.0
    from scipy import stats  # imported on first use, so that `import mipp` stays quick (scipy takes ~1 s)

    return float(stats.ttest_1samp(increases, 0.0, alternative="greater").pvalue)


# ------------------------------------------------------------------------------------------------------ estimator
@register_estimator
class ProxyEstimator(CMIEstimator):
    """Loss-proxy CMI with a one-sided t-test over `repeats` re-fits.

    Options: repeats (R, default 5, at least 2), hidden (MLP width, 32), max_epochs (training g, 100),
    refit_epochs (warm-started re-fits, 50), patience (early stopping, 10; a shorter patience stops a re-fit
    before it has re-routed a masked copy through its twin), lr (Adam, 1e-2), batch_size (128),
    val_fraction / test_fraction (0.2 / 0.2), loss ("auto": cross-entropy for a 1-D integer target, else MSE;
    or "mse" / "ce"), seed (0).
    """

    name = "proxy"

    def __init__(self, repeats: int = 5, hidden: int = 32, max_epochs: int = 100, refit_epochs: int = 50,
                 patience: int = 10, lr: float = 1e-2, batch_size: int = 128, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, loss: str = "auto", seed: int = 0):
        if int(repeats) < 2:
            raise ValueError("the proxy's t-test needs repeats >= 2")
        if loss not in ("auto", "mse", "ce"):
            raise ValueError(f"loss must be 'auto', 'mse' or 'ce', got {loss!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        self.repeats, self.loss, self.seed = int(repeats), loss, int(seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.config = FitConfig(int(hidden), int(max_epochs), int(refit_epochs), int(patience), float(lr),
                                int(batch_size))

    # -- inputs
    def _is_classification(self, y) -> bool:
        if self.loss != "auto":
            return self.loss == "ce"
        if isinstance(y, torch.Tensor):
            integer = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        else:
            integer = np.issubdtype(np.asarray(y).dtype, np.integer)
        return bool(integer and len(y.shape) == 1)

    def _target(self, y, classification: bool) -> torch.Tensor:
        if not classification:
            return as_matrix(y, "y")
        labels = as_matrix(y, "y")
        if labels.shape[1] != 1 or bool((labels != labels.round()).any()) or bool((labels < 0).any()):
            raise ValueError("a cross-entropy target must be one column of non-negative integer class labels")
        return labels[:, 0].long()

    def problem(self, x: torch.Tensor, y) -> ProxyProblem:
        classification = self._is_classification(y)
        target = self._target(y, classification)
        check_same_n(x=x, y=target)
        return ProxyProblem(x, target, classification, self.repeats, self.seed, self.val_fraction,
                            self.test_fraction, self.config)

    # -- estimates
    def _increases(self, x, y, z) -> np.ndarray:
        x = as_matrix(x, "x")
        z = None if z is None else as_matrix(z, "z")
        check_same_n(x=x, z=z)
        inputs = x if z is None else torch.cat([x, z], dim=1)
        prob = self.problem(inputs, y)
        masks = torch.ones(2, inputs.shape[1])
        masks[1, : x.shape[1]] = 0.0  # row 0: control (nothing masked); row 1: x masked
        out = []
        for r in range(self.repeats):
            g = prob.fit(prob.fresh(1, r), masks[:1], r, self.config.max_epochs, key=(r, -1))
            h = prob.fit(repeat_params(g, 2), masks, r, self.config.refit_epochs, key=(r, -2))
            loss = prob.test_nats(h, masks, r)
            out.append(float(loss[1] - loss[0]))
        return np.array(out)

    def cmi(self, x, y, z=None) -> float:
        return float(self._increases(x, y, z).mean())

    def test(self, x, y, z=None, confidence: float = 0.95) -> TestResult:
        confidence = check_confidence(confidence)
        inc = self._increases(x, y, z)
        return decide(inc.mean(), one_sided_p(inc), confidence)

    def session(self, units, target, confidence: float = 0.95) -> "ProxyLayerSession":
        return ProxyLayerSession(self, units, target, confidence)


# -------------------------------------------------------------------------------------------------------- session
class ProxyLayerSession(LayerSession):
    """MIPP sweep state under the loss proxy: one fitted g per repeat for the current kept set.

    A unit's test re-fits g with the unit masked, next to an unmasked control re-fit (per repeat, batched); if the
    unit is then removed, its re-fit becomes the new g, so a sweep costs about R * (2 n_tested + 1) small trainings.
    """

    def __init__(self, estimator: ProxyEstimator, units, target, confidence: float = 0.95):
        units_t, _ = as_units(units, target)
        n, m, f = units_t.shape
        self.estimator, self.confidence = estimator, check_confidence(confidence)
        self.n_units, self.f = m, f
        self.kept = list(range(m))
        self.prob = estimator.problem(units_t.reshape(n, m * f), target)
        self._units, self._target = units_t, target  # what variance_share_lost measures, unstandardised
        self._fitted: dict[int, list[Params]] = {}
        self.g = [self.prob.fit(self.prob.fresh(1, r), self._mask(self.kept), r, estimator.config.max_epochs,
                                key=(r, -1)) for r in range(estimator.repeats)]

    def _mask(self, units: list[int]) -> torch.Tensor:
        mask = torch.zeros(1, self.n_units * self.f)
        for u in units:
            mask[0, u * self.f : (u + 1) * self.f] = 1.0
        return mask

    def _masks_without(self, candidates: list[int]) -> torch.Tensor:
        base = self._mask(self.kept)
        masks = base.repeat(len(candidates), 1)
        for row, u in enumerate(candidates):
            masks[row, u * self.f : (u + 1) * self.f] = 0.0
        return masks

    def _refit(self, candidates: list[int]) -> np.ndarray:
        """(len(candidates), R) held-out loss increases; caches each candidate's re-fitted models.

        Per repeat, one batched fit from g: a control model (nothing masked) and one model per candidate, on the
        same minibatches, so the extra training of the re-fit cancels out of the paired difference.
        """
        masks = torch.cat([self._mask(self.kept), self._masks_without(candidates)])
        cfg = self.estimator.config
        inc = np.zeros((len(candidates), len(self.g)))
        fitted: list[list[Params]] = [[] for _ in candidates]
        for r, g in enumerate(self.g):
            key = (r, len(self.kept), *candidates[:1])
            h = self.prob.fit(repeat_params(g, len(masks)), masks, r, cfg.refit_epochs, key=key)
            loss = self.prob.test_nats(h, masks, r)
            inc[:, r] = (loss[1:] - loss[0]).numpy()
            for row in range(len(candidates)):
                fitted[row].append(select_params(h, row + 1))
        self._fitted = dict(zip(candidates, fitted))
        return inc

    def _variance_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob.classification:
            raise ValueError("variance_share_lost needs a continuous target, not class labels; MIPP's budget mode "
                             "prices units against activations or logits (use confidence mode for a label target)")
        return self._units, as_matrix(self._target, "target")

    def unit_mi(self) -> torch.Tensor:
        """I(X_i;Y) ~ held-out loss of a constant predictor minus that of an MLP on unit i alone (repeat 0)."""
        units = list(range(self.n_units))
        masks = torch.cat([self._mask([u]) for u in units])
        h = self.prob.fit(self.prob.fresh(len(units), 0, -3), masks, 0, self.estimator.config.max_epochs, key=(-3,))
        return torch.as_tensor(self.prob.constant_nats(0) - self.prob.test_nats(h, masks, 0).double().numpy())

    def transfer_entropy(self, i: int) -> TestResult:
        i = self._check_kept(i)
        inc = self._refit([i])[0]
        return decide(inc.mean(), one_sided_p(inc), self.confidence)

    def transfer_entropies(self) -> torch.Tensor:
        out = torch.full((self.n_units,), math.nan, dtype=torch.float64)
        if self.kept:
            out[torch.tensor(self.kept)] = torch.as_tensor(self._refit(list(self.kept)).mean(1))
        return out

    def remove(self, i: int) -> None:
        i = self._check_kept(i)
        fitted = self._fitted.get(i)
        self.kept.remove(i)
        if fitted is None:
            mask = self._mask(self.kept)
            cfg = self.estimator.config
            fitted = [self.prob.fit(g, mask, r, cfg.refit_epochs, key=(r, len(self.kept), i))
                      for r, g in enumerate(self.g)]
        self.g = fitted
        self._fitted = {}
