"""Kraskov-Stoegbauer-Grassberger (KSG) nearest-neighbour estimates of I(X;Y) and I(X;Y|Z), in torch.

Non-parametric: no model of the activations is assumed, which makes it the check on the Gaussian estimator, at the
price of a downward bias that grows with dimension. Conventions (identical to npeet / npeet-plus, in nats):

    MI  (KSG-1):        psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >
    CMI (Frenzel-Pompe): psi(k) - < psi(n_xz + 1) + psi(n_yz + 1) - psi(n_z + 1) >

with max-norm distances, eps_i the distance from sample i to its k-th neighbour in the joint space (self excluded),
and n_s the number of other samples strictly closer than eps_i in the subspace s. Distances come from torch.cdist
(p = inf) per subspace, combined by element-wise maxima; queries are processed in chunks of rows, so memory is
O(chunk * N) (about `max_chunk_bytes`) at any N.

Significance: a permutation null, X shuffled across samples with a seeded generator,
p = (1 + #{null >= observed}) / (1 + n_permutations). For CMI the default shuffle is local (Runge 2018, "conditional
mutual information-based independence test"): X moves only among samples that are close in Z, so the null keeps
the dependence of X on Z and tests only X-Y given Z. A global shuffle breaks X-Z dependence too, and then a unit
that is a (nonlinear or linear) function of the others looks significant because KSG's bias differs between the
two. For small N the pairwise distances are cached once and the permutations only re-index X's distances.

Columns are rescaled to unit standard deviation first (`standardize`): the max-norm mixes features, and KSG is
not invariant to rescaling, so without it a unit that is a scaled copy of another (2 a + 1) gets a spurious
positive CMI given the original. Ties (ReLU zeros, exact copies) make nearest-neighbour counts ill-defined; like
npeet, a tiny uniform noise (`noise` times each column's standard deviation, seeded) breaks them. For a layer
session against a high-dimensional target, KSG is badly biased: `target_components` reduces the target to that
many principal components first (e.g. 2-5), which keeps most of its variance in a space where nearest neighbours
still work.
"""
from __future__ import annotations

import torch

from .base import (
    CMIEstimator,
    GenericLayerSession,
    TestResult,
    as_matrix,
    as_units,
    check_confidence,
    check_same_n,
    decide,
)
from .registry import register_estimator

INF = float("inf")


def _digamma(counts: torch.Tensor) -> torch.Tensor:
    return torch.special.digamma(counts.to(torch.float64))


def _drop_self(d: torch.Tensor, start: int) -> torch.Tensor:
    """Set the distance of each query row to itself to inf (rows are samples start .. start + c)."""
    rows = torch.arange(d.shape[0])
    d[rows, rows + start] = INF
    return d


def _kth_smallest(d: torch.Tensor, k: int) -> torch.Tensor:
    """(c, 1) distance of each row's k-th nearest neighbour (topk is faster than kthvalue for small k)."""
    return torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, -1:]


def _chunk_terms(dx: torch.Tensor, dy: torch.Tensor, dz: torch.Tensor | None, k: int) -> torch.Tensor:
    """Sum over the chunk's rows of the digamma terms (MI: psi(n_x+1)+psi(n_y+1); CMI: psi(n_xz+1)+psi(n_yz+1)-
    psi(n_z+1)). Inputs are (c, N) max-norm distances with self already at inf; they are overwritten."""
    if dz is None:
        joint = torch.maximum(dx, dy)
        eps = _kth_smallest(joint, k)
        del joint
        n_x = (dx < eps).sum(1)
        n_y = (dy < eps).sum(1)
        return (_digamma(n_x + 1) + _digamma(n_y + 1)).sum()
    dxz = torch.maximum(dx, dz, out=dx)
    dyz = torch.maximum(dy, dz, out=dy)
    joint = torch.maximum(dxz, dyz)
    eps = _kth_smallest(joint, k)
    del joint
    n_xz = (dxz < eps).sum(1)
    n_yz = (dyz < eps).sum(1)
    n_z = (dz < eps).sum(1)
    return (_digamma(n_xz + 1) + _digamma(n_yz + 1) - _digamma(n_z + 1)).sum()


def _finish(total: torch.Tensor, n: int, k: int, conditional: bool) -> float:
    const = _digamma(torch.tensor(k)) + (0.0 if conditional else _digamma(torch.tensor(n)))
    return float(const - total / n)


def chunk_rows(n: int, max_chunk_bytes: int, n_matrices: int = 6) -> int:
    """Rows per chunk so that n_matrices (rows, n) float64 matrices fit in max_chunk_bytes."""
    return int(max(1, min(n, max_chunk_bytes // (8 * n * n_matrices))))


def ksg(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None, k: int = 3, max_chunk_bytes: int = 2**24):
    """KSG MI (z None) or Frenzel-Pompe CMI in nats of float64 (N, d) tensors, chunked over query rows."""
    n = x.shape[0]
    rows = chunk_rows(n, max_chunk_bytes)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, rows):
        q = slice(start, min(n, start + rows))
        dx = _drop_self(torch.cdist(x[q], x, p=INF), start)
        dy = _drop_self(torch.cdist(y[q], y, p=INF), start)
        dz = None if z is None else _drop_self(torch.cdist(z[q], z, p=INF), start)
        total += _chunk_terms(dx, dy, dz, k)
    return _finish(total, n, k, z is not None)


def ksg_from_distances(dx: torch.Tensor, dy: torch.Tensor, dz: torch.Tensor | None, k: int, max_chunk_bytes: int):
    """KSG from full (N, N) distance matrices (self at inf), processed in row chunks; inputs are not modified."""
    n = dx.shape[0]
    rows = chunk_rows(n, max_chunk_bytes, n_matrices=3)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, rows):
        q = slice(start, min(n, start + rows))
        total += _chunk_terms(dx[q].clone(), dy[q].clone(), None if dz is None else dz[q], k)
    return _finish(total, n, k, dz is not None)


def principal_components(y: torch.Tensor, n_components: int) -> torch.Tensor:
    """Scores of y (N, d) on its n_components leading principal components (centred; no-op if d <= n_components)."""
    if n_components is None or y.shape[1] <= n_components:
        return y
    centred = y - y.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:n_components].T


def z_neighbours(z: torch.Tensor | None, k: int, max_chunk_bytes: int, dist: torch.Tensor | None = None):
    """(N, k) indices of each sample's k nearest neighbours in Z (max-norm), the sample itself first.

    From Z (N, dz), chunk by chunk, or from its full distance matrix `dist` (N, N) when it is already cached.
    """
    n = z.shape[0] if z is not None else dist.shape[0]
    k = min(k, n)
    rows = chunk_rows(n, max_chunk_bytes, n_matrices=2)
    out = []
    for start in range(0, n, rows):
        q = slice(start, min(n, start + rows))
        d = dist[q].clone() if dist is not None else torch.cdist(z[q], z, p=INF)
        d[torch.arange(d.shape[0]), torch.arange(start, q.stop)] = -1.0  # self first
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out)


def local_permutation(neighbours: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A shuffle of X restricted to Z-neighbourhoods (Runge 2018): sample i takes the X of one of its k nearest
    neighbours in Z, visiting samples in random order and preferring neighbours not used yet (few duplicates)."""
    n, k = neighbours.shape
    order = torch.randperm(n, generator=gen).tolist()
    choice = torch.argsort(torch.rand(n, k, generator=gen), dim=1)
    candidates = torch.gather(neighbours, 1, choice).tolist()
    used = [False] * n
    perm = [0] * n
    for i in order:
        row = candidates[i]
        pick = next((j for j in row if not used[j]), row[0])
        used[pick] = True
        perm[i] = pick
    return torch.tensor(perm, dtype=torch.long)


@register_estimator
class KSGEstimator(CMIEstimator):
    """KSG / Frenzel-Pompe CMI with a permutation test.

    Options: k (neighbours, default 3), n_permutations (default 100), noise (tie-breaking jitter relative to each
    column's std, default 1e-10; 0 disables), seed (default 0), max_chunk_bytes (memory bound of the distance
    chunks, default 16 MiB), cache_bytes (cache full distance matrices for permutations when they fit, default
    256 MiB), target_components (sessions only: reduce the target to this many principal components; default None
    keeps it whole), permutation ("local", default: shuffle X only among each sample's local_k = 5 nearest
    neighbours in Z, Runge 2018; "global": shuffle across all samples; without Z both are global), standardize
    (divide every column by its standard deviation first, default True; set False to reproduce npeet exactly).
    """

    name = "ksg"

    def __init__(
        self,
        k: int = 3,
        n_permutations: int = 100,
        noise: float = 1e-10,
        seed: int = 0,
        max_chunk_bytes: int = 2**24,
        cache_bytes: int = 2**28,
        target_components: int | None = None,
        permutation: str = "local",
        local_k: int = 5,
        standardize: bool = True,
    ):
        self.standardize = bool(standardize)
        if permutation not in ("local", "global"):
            raise ValueError(f"permutation must be 'local' or 'global', got {permutation!r}")
        self.permutation, self.local_k = permutation, max(1, int(local_k))
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if int(n_permutations) < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        if target_components is not None and int(target_components) < 1:
            raise ValueError("target_components must be None or >= 1")
        self.k, self.n_permutations, self.noise, self.seed = int(k), int(n_permutations), float(noise), int(seed)
        self.max_chunk_bytes, self.cache_bytes = int(max_chunk_bytes), int(cache_bytes)
        self.target_components = None if target_components is None else int(target_components)

    # -- inputs
    def _prepare(self, x, y, z):
        x, y = as_matrix(x, "x"), as_matrix(y, "y")
        z = None if z is None else as_matrix(z, "z")
        n = check_same_n(x=x, y=y, z=z)
        if n <= self.k:
            raise ValueError(f"KSG with k={self.k} needs more than k samples, got {n}; pass more samples or lower k")
        gen = torch.Generator().manual_seed(self.seed)
        return tuple(None if a is None else self._jitter(self._scale(a), gen) for a in (x, y, z))

    def _scale(self, a: torch.Tensor) -> torch.Tensor:
        """Each column divided by its standard deviation (constant columns left alone), if `standardize`."""
        if not self.standardize:
            return a
        std = a.std(0, unbiased=False)
        return a / torch.where(std > 0, std, torch.ones_like(std))

    def _jitter(self, a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.noise <= 0:
            return a
        scale = a.std(0, unbiased=False)
        return a + self.noise * scale * torch.rand(a.shape, generator=gen, dtype=a.dtype)

    # -- estimates
    def cmi(self, x, y, z=None) -> float:
        x, y, z = self._prepare(x, y, z)
        return ksg(x, y, z, self.k, self.max_chunk_bytes)

    def test(self, x, y, z=None, confidence: float = 0.95) -> TestResult:
        confidence = check_confidence(confidence)
        x, y, z = self._prepare(x, y, z)
        observed, null = self._permutation_null(x, y, z)
        p = (1.0 + float((null >= observed).sum())) / (1.0 + len(null))
        return decide(observed, p, confidence)

    def _permutation_null(self, x, y, z):
        """Observed estimate and the estimates with X's rows permuted (seeded; locally within Z if asked)."""
        n = x.shape[0]
        gen = torch.Generator().manual_seed(self.seed + 1)
        cached = 8 * n * n * 3 <= self.cache_bytes
        dist = [None if a is None else _drop_self(torch.cdist(a, a, p=INF), 0) for a in (x, y, z)] if cached else None
        if self.permutation == "local" and z is not None:
            neighbours = z_neighbours(z, self.local_k, self.max_chunk_bytes, dist=None if dist is None else dist[2])
            perms = [local_permutation(neighbours, gen) for _ in range(self.n_permutations)]
        else:
            perms = [torch.randperm(n, generator=gen) for _ in range(self.n_permutations)]
        if cached:
            dx, dy, dz = dist
            observed = ksg_from_distances(dx, dy, dz, self.k, self.max_chunk_bytes)
            null = [ksg_from_distances(dx[p][:, p], dy, dz, self.k, self.max_chunk_bytes) for p in perms]
        else:
            observed = ksg(x, y, z, self.k, self.max_chunk_bytes)
            null = [ksg(x[p], y, z, self.k, self.max_chunk_bytes) for p in perms]
        return observed, torch.tensor(null, dtype=torch.float64)

    # -- sessions
    def session(self, units, target, confidence: float = 0.95) -> GenericLayerSession:
        units, y = as_units(units, target)
        return GenericLayerSession(self, units, principal_components(y, self.target_components), confidence, y)
