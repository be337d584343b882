"""Benchmark of the MI estimators (not a test): what one CMI costs, what a whole layer costs, and KSG's memory.

Prints, from one run on this machine:
1. time per I(X;Y|Z) at n = 2,000 for (dx, dy, dz) = (1, 10, 20) and (1, 128, 63), for the Gaussian, KSG
   (estimate only, no permutation test), loss-proxy (R = 5 re-fits) estimators and the reference npeet-plus,
   with ratios to the Gaussian estimator and to npeet-plus;
2. scoring all units of a 512-unit layer against a 512-dimensional target with the Gaussian session (one shot,
   then a sweep with rank-one downdates) against recomputing log-determinants from scratch for every unit;
3. KSG's peak memory at n = 20,000, measured in a subprocess as the rise of its peak resident set size during the
   estimate (peak reset through /proc/self/clear_refs, then VmHWM - VmRSS), next to the chunk-size accounting.

Run: .venv/bin/python benchmarks/bench_mi.py [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from mipp.mi import GaussianEstimator, GaussianMoments, KSGEstimator, ProxyEstimator
from mipp.mi.gaussian import cholesky, logdet
from mipp.mi.ksg import chunk_rows


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def cmi_data(n: int, dx: int, dy: int, dz: int, seed: int = 0):
    """Non-Gaussian dependent data: y and z are noisy nonlinear functions of shared latent factors and of x."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 4))
    x = latent[:, :dx] + 0.5 * rng.standard_normal((n, dx))
    z = np.tanh(latent @ rng.standard_normal((4, dz))) + 0.5 * rng.standard_normal((n, dz))
    y = np.tanh(np.c_[x, latent] @ rng.standard_normal((dx + 4, dy))) + 0.5 * rng.standard_normal((n, dy))
    return x, y, z


# --------------------------------------------------------------------------------------------- 1. time per CMI
def bench_per_cmi(n: int, quick: bool) -> None:
    import npeet_plus

    estimators = {
        "gaussian": GaussianEstimator(),
        "ksg (k=3)": KSGEstimator(),
        "proxy (R=5)": ProxyEstimator(repeats=2 if quick else 5),
        "npeet-plus": None,
    }
    print(f"\n1. Time per CMI I(X;Y|Z) at n = {n} (seconds, best of runs; ratio = time / time of the reference)")
    print(f"   {'dims (dx,dy,dz)':<17}{'estimator':<14}{'time s':>10}{'/ gaussian':>12}{'/ npeet':>10}{'value':>9}")
    for dims in ((1, 10, 20), (1, 128, 63)):
        x, y, z = cmi_data(n, *dims)
        rows = {}
        for name, est in estimators.items():
            if est is None:
                fn = lambda: npeet_plus.mi(x, y, z, k=3, base=np.e)  # noqa: E731
            else:
                fn = lambda est=est: est.cmi(x, y, z)  # noqa: E731
            repeat = 3 if name in ("gaussian",) else 1
            rows[name] = timed(fn, repeat)
        for name, (seconds, value) in rows.items():
            ratio_g = seconds / rows["gaussian"][0]
            ratio_n = seconds / rows["npeet-plus"][0]
            print(f"   {str(dims):<17}{name:<14}{seconds:>10.4f}{ratio_g:>12.1f}{ratio_n:>10.3f}{value:>9.3f}")


# ------------------------------------------------------------------------------------- 2. a 512-unit layer
def scratch_phi(cov: torch.Tensor, kept: list[int], i: int, width: int) -> float:
    """Phi_i = 1/2 [log det Cov(Y | X_{S minus i}) - log det Cov(Y | X_S)], both refactorised from the covariance."""

    def residual_logdet(units: list[int]) -> torch.Tensor:
        idx = torch.tensor(units, dtype=torch.long)
        ycols = torch.arange(width, cov.shape[0])
        s_xy = cov[idx][:, ycols]
        explained = s_xy.T @ torch.cholesky_solve(s_xy, cholesky(cov[idx][:, idx]))
        return logdet(cov[ycols][:, ycols] - explained)

    return float(0.5 * (residual_logdet([j for j in kept if j != i]) - residual_logdet(kept)))


def bench_layer(n: int, width: int, d_y: int, scratch_steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n, 64, generator=g, dtype=torch.float64)
    units = torch.relu(latent @ torch.randn(64, width, generator=g, dtype=torch.float64)
                       + 0.5 * torch.randn(n, width, generator=g, dtype=torch.float64))
    read = width // 4  # the target reads a quarter of the units: the others are redundant given them
    target = (units[:, :read] @ torch.randn(read, d_y, generator=g, dtype=torch.float64) / read**0.5
              + 0.1 * torch.randn(n, d_y, generator=g, dtype=torch.float64))
    est = GaussianEstimator()
    units32, target32 = units.float(), target.float()  # activations as a network produces them

    def moments():
        return GaussianMoments().update(units32, target32)

    t_cov, acc = timed(moments)
    t_factor, session = timed(lambda: est.session_from_moments(acc, width))
    cov = session.cov
    t_all, phi = timed(lambda: session.transfer_entropies())
    t_scratch_all, ref = timed(lambda: [scratch_phi(cov, list(range(width)), i, width) for i in range(width)])
    err = float((phi - torch.tensor(ref, dtype=torch.float64)).abs().max())
    order = torch.argsort(session.unit_mi()).tolist()

    def sweep():
        s, tests = est.session_from_moments(acc, width), 0
        for i in order:
            if len(s.kept) == 1:
                break
            tests += 1
            if not s.transfer_entropy(i).significant:
                s.remove(i)
        return tests, s.kept

    t_sweep, (n_tests, kept) = timed(sweep)
    removed = [i for i in order[:n_tests] if i not in kept]

    def scratch_sweep_prefix():  # the same decisions, each transfer entropy recomputed from the covariance
        current = list(range(width))
        for i in order[:scratch_steps]:
            scratch_phi(cov, current, i, width)
            if i in removed:
                current.remove(i)

    t_scratch_prefix, _ = timed(scratch_sweep_prefix)
    t_scratch_sweep = t_scratch_prefix / scratch_steps * n_tests
    one_shot = t_factor + t_all

    print(f"\n2. Gaussian path: {width} units vs a {d_y}-dimensional target, n = {n} (float32 activations)")
    print(f"   {'task':<62}{'time s':>10}{'ratio':>9}")
    print(f"   {'streaming moments + covariance (shared by both paths)':<62}{t_cov:>10.3f}")
    print(f"   {'one shot: P, B, Q + all ' + str(width) + ' transfer entropies':<62}{one_shot:>10.3f}{1.0:>9.1f}")
    print(f"   {'from scratch: 2 log-dets of Cov(Y | X_S) per unit':<62}{t_scratch_all:>10.3f}"
          f"{t_scratch_all / one_shot:>9.1f}")
    print(f"   max |one shot - from scratch| = {err:.1e} nats")
    print(f"   {f'sweep with downdates ({n_tests} tests, {len(removed)} removals, incl. set-up)':<62}"
          f"{t_sweep:>10.3f}{1.0:>9.1f}")
    print(f"   {f'sweep from scratch (first {scratch_steps} steps timed, scaled to {n_tests})':<62}"
          f"{t_scratch_sweep:>10.3f}{t_scratch_sweep / t_sweep:>9.1f}")


# --------------------------------------------------------------------------------------------- 3. KSG memory
CHILD = """
import sys, time, numpy as np, torch
torch.set_num_threads({threads})
from mipp.mi import KSGEstimator

def status(key):  # kB values from /proc/self/status
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1])

rng = np.random.default_rng(0)
n = {n}
x, z = rng.standard_normal((n, 1)), rng.standard_normal((n, 20))
y = np.tanh(x + z[:, :10] @ rng.standard_normal((10, 10))) + 0.3 * rng.standard_normal((n, 10))
est = KSGEstimator(max_chunk_bytes={budget})
est.cmi(x[:50], y[:50], z[:50])  # warm up the code paths
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the peak RSS (VmHWM) to the current RSS
before = status('VmRSS')
start = time.perf_counter()
value = est.cmi(x, y, z)
seconds = time.perf_counter() - start
print(before, status('VmHWM'), value, seconds)
"""


def bench_ksg_memory(n: int, threads: int) -> None:
    budget = KSGEstimator().max_chunk_bytes
    code = CHILD.format(n=n, budget=budget, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak, value, seconds = int(out[0]) / 1024, int(out[1]) / 1024, float(out[2]), float(out[3])
    rows = chunk_rows(n, budget)
    accounted = rows * n * 8 * 6 / 2**20
    inputs = n * (1 + 10 + 20) * 8 * 3 / 2**20  # float64 copies: validated, rescaled, jittered
    print(f"\n3. KSG peak memory at n = {n}, dims (1, 10, 20), k = 3, max_chunk_bytes = {budget / 2**20:.0f} MiB")
    print(f"   estimate {value:.3f} nats in {seconds:.1f} s; {rows} query rows per chunk")
    print(f"   chunk accounting: 6 distance matrices of {rows} x {n} float64 = {accounted:.1f} MiB"
          f" (+ {inputs:.1f} MiB of input copies)")
    print(f"   measured in a subprocess (peak RSS reset via /proc/self/clear_refs, then VmHWM - VmRSS):"
          f" {peak - before:.1f} MiB above the {before:.0f} MiB before the estimate")
    print(f"   (one full N x N float64 distance matrix would be {n * n * 8 / 2**30:.1f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"mipp MI benchmark: torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    bench_per_cmi(2000, args.quick)
    bench_layer(n=4000, width=128 if args.quick else 512, d_y=128 if args.quick else 512,
                scratch_steps=8 if args.quick else 32)
    bench_ksg_memory(4000 if args.quick else 20_000, args.threads)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; self max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
