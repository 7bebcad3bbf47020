"""Streaming co-moments of probe losses and the draw: observable-refined LLCs and the Bayesian
influence of probe samples, from the chains' own draws, with no draw traces kept.

Flow: chains -> (per draw) the probe losses at ``w* + xi`` and the draw ``d`` -> **ProbeMoments**
-> :class:`online_llc.records.ProbeResult`.

What is computed. For probe samples ``k = 1..K`` (a fixed set, evaluated at every draw) let
``delta_k = l_k(w* + xi) - l_k(w*)`` and ``d`` the draw at the same ``xi``
(:mod:`online_llc.kernel.step`). Over the localized posterior::

    observable-refined LLC    nbeta * mean_k E[delta_k]
    influence of sample k     -Cov(delta_k, d)          (the Bayesian influence function, BIF)
    susceptibility of the set -Cov(mean_k delta_k, d)   (the mean influence; with the chain moving
                                                         one weight group only, that component's)
    correlation of sample k   Corr(delta_k, d)          (devinterp's convention: Pearson, no nbeta, no sign)
    loss kernel (optional)    Cov(delta_k, delta_j)     (K x K per set, only when asked)

A sample whose loss rises when the training loss rises has negative influence in this convention:
up-weighting it pulls the posterior towards where it is low. The correlation is scale-free, so
devinterp's BIF of a probe's loss against the training loss (Pearson over draws) is comparable
with it directly.

How the standard errors are made. Each chain's draws are cut into consecutive segments of a fixed
length; a segment keeps the sums of ``d``, ``d^2``, ``delta``, ``delta^2`` and ``delta d`` (O(K)
numbers; with the kernel, also each set's ``K x K`` sums of ``delta delta^T``). A segment's covariance is centred on its chain's means, so the segments' estimates
average to the chain's covariance, and the standard error is the spread of the segments'
estimates over the square root of their number (batch means): honest where a segment is longer
than the chain's autocorrelation time, which the estimator's plan ensures (its draws span several
relaxation times, cut into at most :data:`SEGMENTS` segments per chain).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["ProbeMoments", "SEGMENTS"]

#: A probe set's range ``(lo, hi)`` among all the probes.
Block = Tuple[int, int]

#: Segments per chain at the planned number of draws (more when draws are added later).
SEGMENTS = 8


class ProbeMoments:
    """Segment sums of the probe losses' differences and the draws of ``num_chains`` chains.

    Args:
        num_chains: ``C``.
        num_probes: ``K``.
        segment: draws per segment (the last one of a chain may be shorter).
        blocks: the probe ranges ``(lo, hi)`` (one per set) whose loss kernel
            ``Cov(delta_k, delta_j)`` is kept (none by default): a ``[hi - lo, hi - lo]`` matrix of
            sums per segment.
    """

    def __init__(self, num_chains: int, num_probes: int, segment: int, blocks: Sequence[Block] = ()) -> None:
        if segment < 1:
            raise ValueError(f"Expected `segment` to be at least 1, got {segment}.")
        self.num_chains, self.num_probes, self.segment = num_chains, num_probes, segment
        self.blocks: List[Block] = [(int(lo), int(hi)) for lo, hi in blocks]
        # Per chain, a list of segments: [n, sum d, sum d^2] and [3, K] sums of delta, delta^2, delta d,
        # and per block the sums of delta delta^T.
        self._scalars: List[List[np.ndarray]] = [[] for _ in range(num_chains)]
        self._vectors: List[List[np.ndarray]] = [[] for _ in range(num_chains)]
        self._kernels: List[List[List[np.ndarray]]] = [[] for _ in range(num_chains)]

    def add(self, chain: int, delta: np.ndarray, draw: float) -> None:
        """One draw of ``chain``: the probe losses' differences ``delta`` ``[K]`` and the draw."""
        scalars, vectors, kernels = self._scalars[chain], self._vectors[chain], self._kernels[chain]
        if not scalars or scalars[-1][0] >= self.segment:
            scalars.append(np.zeros(3))
            vectors.append(np.zeros((3, self.num_probes)))
            kernels.append([np.zeros((hi - lo, hi - lo)) for lo, hi in self.blocks])
        delta = np.asarray(delta, dtype=np.float64)
        scalars[-1] += (1.0, draw, draw * draw)
        vectors[-1] += np.stack([delta, delta * delta, delta * draw])
        for k, (lo, hi) in zip(kernels[-1], self.blocks):
            k += np.outer(delta[lo:hi], delta[lo:hi])

    def add_segment(self, chain: int, scalars: np.ndarray, vectors: np.ndarray, kernels: Sequence[np.ndarray] = ()) -> None:
        """A whole segment of ``chain`` at once: its sums ``[n, sum d, sum d^2]`` and
        ``[sum delta, sum delta^2, sum delta d]`` ``[3, K]`` (the monitor's windows), and each
        block's sums of ``delta delta^T``."""
        if len(kernels) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} kernel sums (one per block), got {len(kernels)}.")
        self._scalars[chain].append(np.asarray(scalars, dtype=np.float64).copy())
        self._vectors[chain].append(np.asarray(vectors, dtype=np.float64).copy())
        self._kernels[chain].append([np.asarray(k, dtype=np.float64).copy() for k in kernels])

    def drop_oldest(self) -> None:
        """Forget every chain's oldest segment."""
        for scalars, vectors, kernels in zip(self._scalars, self._vectors, self._kernels):
            if scalars:
                del scalars[0], vectors[0], kernels[0]

    @property
    def segments(self) -> int:
        """Segments kept over all chains."""
        return sum(len(s) for s in self._scalars)

    def select(self, lo: int, hi: int) -> "ProbeMoments":
        """The same draws restricted to probes ``lo`` to ``hi - 1`` (one probe set of several);
        shares the draws' sums, and keeps the kernel where ``(lo, hi)`` is one of the blocks."""
        part = ProbeMoments(self.num_chains, hi - lo, self.segment)
        part._scalars = self._scalars
        part._vectors = [[v[:, lo:hi] for v in chain] for chain in self._vectors]
        if (lo, hi) in self.blocks:
            b = self.blocks.index((lo, hi))
            part.blocks = [(0, hi - lo)]
            part._kernels = [[[ks[b]] for ks in chain] for chain in self._kernels]
        else:
            part._kernels = [[[] for _ in chain] for chain in self._kernels]
        return part

    @property
    def count(self) -> int:
        """Draws added over all chains."""
        return int(sum(s[0] for chain in self._scalars for s in chain))

    def _segments(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per segment (rows, over all chains): its draw count, its mean delta ``[S, K]``, its
        covariance of delta and d and its variances of delta ``[S, K]`` and d ``[S]``, centred on
        its chain's means."""
        ns, means, covs, vds, vks = [], [], [], [], []
        for scalars, vectors in zip(self._scalars, self._vectors):
            if not scalars:
                continue
            s, v = np.stack(scalars), np.stack(vectors)  # [S_c, 3], [S_c, 3, K]
            n = s[:, 0].sum()
            b = s[:, 1].sum() / n  # the chain's mean draw
            a = v[:, 0].sum(0) / n  # the chain's mean delta [K]
            L = s[:, 0:1]
            sd, sdd, sk, skk, skd = s[:, 1:2], s[:, 2:3], v[:, 0], v[:, 1], v[:, 2]
            ns.append(s[:, 0])
            means.append(sk / L)
            covs.append((skd - b * sk - a * sd + L * a * b) / L)
            vks.append((skk - 2 * a * sk + L * a * a) / L)
            vds.append(((sdd - 2 * b * sd + L * b * b) / L)[:, 0])
        return tuple(np.concatenate(x) for x in (ns, means, covs, vks, vds))  # type: ignore[return-value]

    def summary(self, nbeta: float) -> dict:
        """The estimates and their standard errors (NaN with fewer than two segments):
        ``llc`` and ``llc_std`` (``nbeta * mean_k E[delta_k]``), ``influence``, ``influence_std``,
        ``correlation`` and ``correlation_std`` (``[K]`` arrays), ``susceptibility`` and
        ``susceptibility_std``, ``count``; ``kernel`` and ``kernel_std`` (``[K, K]``, with the
        kernel kept for the whole selection; else None)."""
        n, mean, cov, var_k, var_d = self._segments()
        w = n / n.sum()
        segs = len(n)

        def pooled(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            # The draw-weighted mean of the segments' estimates and its batch-means standard error.
            m = np.tensordot(w, x, axes=1)
            if segs < 2:
                return m, np.full_like(m, math.nan)
            spread = np.tensordot(w, (x - m) ** 2, axes=1) * segs / (segs - 1)
            return m, np.sqrt(spread / segs)

        kernel, kernel_se = pooled(self._kernel_segments()) if self.blocks == [(0, self.num_probes)] else (None, None)
        llc, llc_se = pooled(nbeta * mean.mean(axis=1))
        c, c_se = pooled(cov)
        chi, chi_se = pooled(cov.mean(axis=1))
        vk, vd = np.tensordot(w, var_k, axes=1), float(np.dot(w, var_d))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = c / np.sqrt(vk * vd)
            corr_se = c_se / np.sqrt(vk * vd)  # the variances taken as known: their noise is smaller
        return {
            "llc": float(llc), "llc_std": float(llc_se), "influence": -c, "influence_std": c_se,
            "correlation": corr, "correlation_std": corr_se, "count": int(n.sum()),
            "susceptibility": -float(chi), "susceptibility_std": float(chi_se),
            "kernel": kernel, "kernel_std": kernel_se,
        }

    def _kernel_segments(self) -> np.ndarray:
        """Per segment (rows, over all chains, in :meth:`_segments`' order) its loss kernel
        ``Cov(delta_k, delta_j)`` ``[S, K, K]``, centred on its chain's means (one block: the
        whole selection)."""
        out = []
        for scalars, vectors, kernels in zip(self._scalars, self._vectors, self._kernels):
            if not scalars:
                continue
            s, v = np.stack(scalars), np.stack(vectors)
            kk = np.stack([k[0] for k in kernels])  # [S_c, K, K]
            L = s[:, 0][:, None, None]
            a = v[:, 0].sum(0) / s[:, 0].sum()  # the chain's mean delta [K]
            sk = v[:, 0]  # [S_c, K]
            cross = sk[:, :, None] * a[None, None, :]
            out.append((kk - cross - np.swapaxes(cross, 1, 2) + L * np.outer(a, a)[None]) / L)
        return np.concatenate(out)
