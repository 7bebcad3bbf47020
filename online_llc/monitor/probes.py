"""Probe sets watched live: at every shadow step the whole model's chains evaluate fixed samples
at ``w* + xi`` and at the centre, for each set's observable-refined LLC (a band, like the LLC's)
and each sample's Bayesian influence (pooled over recent windows).

Flow: OnlineLLC.update -> ShadowSampler.step (**before**: the probes' losses at each chain's
offset and at the centre; **after**: paired with the chains' draws) -> per set a WindowStats and
an LLCFilter (the observable-refined LLC), per window the co-moments of the probes' differences
and the draws (:mod:`online_llc.stats.probes`) -> records.

With ``delta_k = l_k(w* + xi) - l_k(w*)`` (the centre's losses computed once per shadow step and
shared by the chains) and ``d`` the chain's draw at the same ``xi``:

* each set's draw ``nbeta * mean_k delta_k`` goes through its own window statistics and filter,
  with the whole model's windows: a window the whole model's filter did not absorb (warm-up, a
  reset chain) is left out here too;
* each window's sums of ``d``, ``delta``, their squares and products join a segment; a segment
  closes after two relaxation times of the chains' slowest direction, and the last
  :data:`KEPT_SEGMENTS` segments give the influence ``-Cov(delta_k, d)``, the correlation and the
  set's susceptibility with batch-means standard errors (with ``probe_kernel=True``, also each
  set's loss kernel ``Cov(delta_k, delta_j)``, from ``K x K`` sums per window and segment). A
  warm-up window or a jump of the level (a ``transition``) starts them afresh: they describe the
  weights since.

With weight groups (``groups=``) each group's chains evaluate the probe sets too, at their own
offsets (the group's parameters moved, the rest at ``w*``), at each group shadow step: the same
statistics against the group chain's draw give that component's susceptibility to each set,
``-Cov(mean_k delta_k, d_group)`` (``OnlineLLC.susceptibilities()``), as
``estimate_llc(..., params=group, probes=...)`` reads it offline. Each group step then costs
``(C + 1) K`` more probe losses.

Under DDP (``gather``) each rank evaluates the probes at its own chains' offsets; the sets'
window statistics and each window's sums are gathered with the whole model's ``gather``, so every
rank holds every chain's statistics and the same estimates. Under FSDP2 the chains span the
ranks: every rank evaluates the whole probe sets at every chain's offset with the sharded model
(the same collective forward on every rank), so every rank holds the same statistics without a
gather; the sets must be the same on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

from online_llc.calibration.step import relaxation_steps
from online_llc.kernel.probes import ProbeBatches, check_kernel_size, kernel_blocks, probe_results, require_probes
from online_llc.monitor.window import WindowStats
from online_llc.records import FILTERED_STATUSES, LLCEstimate, ProbeResult
from online_llc.stats.filter import LLCFilter
from online_llc.stats.probes import ProbeMoments

__all__ = ["KEPT_SEGMENTS", "OnlineProbes", "probe_sets", "set_influence", "susceptibilities"]

#: Segments of the influence's statistics kept (the oldest forgotten first).
KEPT_SEGMENTS = 16


def probe_sets(probes: Optional[Mapping[str, Any]], evaluator: Any, settings: Any) -> Optional[ProbeBatches]:
    """The monitor's probe sets, checked (``None`` without ``probes``), with ``settings``'
    ``probe_loss_fn``.

    Under FSDP2 every rank evaluates the whole probe sets with the model's forward (a collective),
    so every rank must pass the same sets: their losses at the current weights are compared
    across the ranks here.

    Raises:
        ValueError: ``probe_kernel`` or ``probe_loss_fn`` without probe sets, probe sets that differ
            between the ranks of a model sharded by FSDP2, or what
            :class:`~online_llc.kernel.probes.ProbeBatches` refuses.
    """
    require_probes(probes, settings.probe_kernel, settings.probe_loss_fn)
    if probes is None:
        return None
    sets = ProbeBatches(probes, evaluator, settings.probe_loss_fn)
    if evaluator.sharded:
        own = sets.initial_losses.double()
        mean = evaluator.all_reduce_sum(own) / evaluator.world
        if not torch.allclose(mean, own, rtol=1e-6, atol=1e-12):
            raise ValueError(
                "Expected the same `probes` on every rank of a model sharded by FSDP2 (each rank evaluates the whole "
                "sets with the sharded model), got probe losses that differ between the ranks."
            )
    return sets


def susceptibilities(group_probes: Mapping[str, "OnlineProbes"]) -> Dict[str, Dict[str, Any]]:
    """``{group: {probe set: (susceptibility, its standard error)}}`` from each group's chains,
    for the groups whose statistics hold two segments per chain (empty without groups or probes)."""
    found = {g: p.influence() for g, p in group_probes.items()}
    return {g: {k: (r.susceptibility, r.susceptibility_std) for k, r in f.items()} for g, f in found.items() if f}


def set_influence(probes: Optional["OnlineProbes"], name: str) -> Optional[ProbeResult]:
    """Probe set ``name``'s :class:`~online_llc.records.ProbeResult` from the whole model's chains
    (:meth:`OnlineProbes.influence`), or ``None`` before two segments per chain have closed.

    Raises:
        KeyError: an unknown set, or a monitor without probe sets.
    """
    if probes is None or name not in probes.names:
        raise KeyError(f"No probe set {name!r}; the sets are {[] if probes is None else list(probes.names)}.")
    return probes.influence().get(name)


class OnlineProbes:
    """The probe sets of one monitor (see the module docstring).

    Args:
        batches: the checked probe sets.
        num_chains: the whole model's chains ``C``.
        window: draws per window ``W``.
        horizon: the window statistics' horizon (as the whole model's).
        z: the band's normal quantile.
        process_noise, jump_threshold: the filters' settings (as the whole model's).
        nbeta: the chains' ``nbeta`` (fixed for a monitor: calibration moves only the step).
        gather: the whole model's ``gather`` under DDP.
        kernel: also each set's loss kernel ``Cov(delta_k, delta_j)``.

    Raises:
        ValueError: kernels that would not fit (:func:`~online_llc.kernel.probes.check_kernel_size`:
            ``KEPT_SEGMENTS + 2`` copies per chain; under DDP each rank holds every rank's chains').
    """

    def __init__(self, batches: ProbeBatches, num_chains: int, window: int, horizon: int, z: float,
                 process_noise: float, jump_threshold: float, nbeta: float,
                 gather: Optional[Callable[[np.ndarray], np.ndarray]] = None, kernel: bool = False) -> None:
        self.batches, self.num_chains, self.window, self._z, self.gather = batches, num_chains, window, z, gather
        self.nbeta = nbeta
        self.names, self.sizes = batches.names, batches.sizes
        self.num_probes = sum(self.sizes)
        self.blocks = kernel_blocks(self.sizes) if kernel else []
        if kernel:  # the kept segments, the open segment and the window
            check_kernel_size(self.sizes, num_chains * (KEPT_SEGMENTS + 2))
        self.stats = {n: WindowStats(window, num_chains, horizon=horizon, gather=gather) for n in self.names}
        self.filters = {n: LLCFilter(process_noise=process_noise, jump_threshold=jump_threshold) for n in self.names}
        self.histories: Dict[str, List[LLCEstimate]] = {n: [] for n in self.names}
        self.last: Dict[str, LLCEstimate] = {}
        #: Chains whose sums the influence pools: this process's, or every rank's under DDP (set
        #: at the first gathered window).
        self.pooled_chains = num_chains
        self._reset_influence()
        self._window_sums()
        self._pending: Optional[np.ndarray] = None
        self._summaries: Dict[str, Any] = {}
        self._stale = False

    @classmethod
    def build(cls, batches: ProbeBatches, monitor: Any, track: Any = None) -> "OnlineProbes":
        """The probe sets of ``monitor`` (an :class:`~online_llc.OnlineLLC`) beside its whole
        model's chains, or beside a group's ``track`` (its chains' draws: that weight group's
        susceptibilities; no loss kernel, which is the whole model's), with their windows and
        filter settings."""
        s = monitor.settings
        stats = (track or monitor._model).stats
        return cls(batches, monitor.num_chains, monitor.window, stats.horizon, monitor._z, s.process_noise,
                   s.jump_threshold, monitor.config.nbeta, gather=stats.gather, kernel=s.probe_kernel and track is None)

    def _kernel_zeros(self, chains: int) -> List[np.ndarray]:
        return [np.zeros((chains, hi - lo, hi - lo)) for lo, hi in self.blocks]

    def _window_sums(self) -> None:
        self._scalars = np.zeros((self.num_chains, 3))
        self._vectors = np.zeros((self.num_chains, 3, self.num_probes))
        self._kernels = self._kernel_zeros(self.num_chains)

    def _reset_influence(self) -> None:
        self.moments = ProbeMoments(self.pooled_chains, self.num_probes, segment=1, blocks=self.blocks)
        self._seg_scalars = np.zeros((self.pooled_chains, 3))
        self._seg_vectors = np.zeros((self.pooled_chains, 3, self.num_probes))
        self._seg_kernels = self._kernel_zeros(self.pooled_chains)
        self._seg_windows = 0

    def _gathered_window(self) -> Any:
        """This window's sums of every chain (every rank's under DDP: one collective, on every
        rank at every window of the whole model)."""
        if self.gather is None:
            return self._scalars, self._vectors, self._kernels
        k, c = self.num_probes, self.num_chains
        parts = [self._scalars, self._vectors.reshape(c, 3 * k)] + [m.reshape(c, -1) for m in self._kernels]
        got = np.asarray(self.gather(np.concatenate(parts, axis=1)[None]), dtype=np.float64)[0]  # [R C, 3 + 3 K + ...]
        if got.shape[0] != self.pooled_chains:
            self.pooled_chains = got.shape[0]
            self._reset_influence()
        kernels, at = [], 3 + 3 * k
        for lo, hi in self.blocks:
            kernels.append(got[:, at:at + (hi - lo) ** 2].reshape(-1, hi - lo, hi - lo))
            at += (hi - lo) ** 2
        return got[:, :3], got[:, 3:3 + 3 * k].reshape(-1, 3, k), kernels

    # ---- the shadow step's hooks (ShadowSampler.step) ---------------------------------------------
    def before(self, sampler: Any) -> None:
        """The probes' differences at each chain's offset ``[C, K]``, before the chains move."""
        losses = self.batches.losses_at(sampler.evaluator.center(), sampler.offsets).double().cpu().numpy()
        self._pending = losses[1:] - losses[0]

    def after(self, out: Any, step: int) -> None:
        """Pair the differences with the step's draws (``out``: the sampler's ShadowStep)."""
        delta, self._pending = self._pending, None
        if delta is None:
            return
        flags = [1 if bad else 0 for bad in out.diverged]
        draws = np.array([0.0 if bad else info.draw for info, bad in zip(out.infos, out.diverged)])
        for c, bad in enumerate(out.diverged):
            if not bad and np.all(np.isfinite(delta[c])):
                self._scalars[c] += (1.0, draws[c], draws[c] ** 2)
                self._vectors[c] += np.stack([delta[c], delta[c] ** 2, delta[c] * draws[c]])
                for m, (lo, hi) in zip(self._kernels, self.blocks):
                    m[c] += np.outer(delta[c, lo:hi], delta[c, lo:hi])
        self._feed(step, flags, delta)

    def _feed(self, step: int, flags: List[int], delta: Optional[np.ndarray]) -> None:
        """Each set's draw ``nbeta * mean_k delta_k`` per chain (a placeholder where flagged)."""
        lo = 0
        for name, size in zip(self.names, self.sizes):
            if delta is None:
                d = [0.0] * self.num_chains
            else:
                d = [0.0 if flags[c] or not np.all(np.isfinite(delta[c, lo:lo + size]))
                     else self.nbeta * float(np.mean(delta[c, lo:lo + size])) for c in range(self.num_chains)]
            summary = self.stats[name].update(d, [0.0] * self.num_chains, step, flags=flags)
            if summary is not None:
                self._summaries[name] = summary
            lo += size

    def skip(self, step: int) -> None:
        """A placeholder draw per chain (the monitor's :meth:`~online_llc.OnlineLLC.skip_step`)."""
        self._pending = None
        self._feed(step, [1] * self.num_chains, None)

    # ---- at the whole model's window ---------------------------------------------------------------
    def close(self, est: LLCEstimate, config: Any) -> None:
        """The whole model's window ``est`` closed: each set's window (absorbed when the whole
        model's was), and the influence's segments."""
        summaries, self._summaries = self._summaries, {}
        filtered = est.status in FILTERED_STATUSES
        window_scalars, window_vectors, window_kernels = self._gathered_window()
        self.last = {}
        for name in self.names:
            s = summaries.get(name)
            if s is None:
                continue
            if filtered and not (s.diverged_draws or s.warmup_draws):
                mean, std, info = self.filters[name].update(s.mean, max(s.se**2, 1e-300), s.end_step,
                                                            r_test=max(s.se_window**2, 1e-300), force_jump=self._stale)
                slope, nis = self.filters[name].slope, info.nis
            else:
                mean, std, slope, nis = s.mean, s.se, math.nan, math.nan
                self.stats[name].clear_history()
            rec = LLCEstimate(
                step=s.end_step, mean=mean, std=std, lower=mean - self._z * std, upper=mean + self._z * std,
                status=est.status, raw_mean=s.mean, raw_se=s.se, slope=slope, var_channel=s.var_channel, ratio=s.ratio,
                dispersion=s.dispersion, ess=s.ess, nis=nis, window_start=s.start_step, shadow_steps=est.shadow_steps,
                divergences=est.divergences, step_size=est.step_size,
            )
            self.histories[name].append(rec)
            self.last[name] = rec
        self._stale = not filtered
        if filtered and est.status != "transition":
            self._seg_scalars += window_scalars
            self._seg_vectors += window_vectors
            for m, w in zip(self._seg_kernels, window_kernels):
                m += w
            self._seg_windows += 1
            if self._seg_windows * self.window >= 2 * relaxation_steps(config):
                for c in range(self.pooled_chains):
                    if self._seg_scalars[c, 0] > 0:
                        self.moments.add_segment(c, self._seg_scalars[c], self._seg_vectors[c],
                                                 [m[c] for m in self._seg_kernels])
                while self.moments.segments > KEPT_SEGMENTS * self.pooled_chains:
                    self.moments.drop_oldest()
                self._seg_scalars[:] = 0.0
                self._seg_vectors[:] = 0.0
                for m in self._seg_kernels:
                    m[:] = 0.0
                self._seg_windows = 0
        else:
            # Warm-up, a reset chain or a jump of the level: the weights the influence describes changed.
            self._reset_influence()
        self._window_sums()

    def influence(self) -> Dict[str, ProbeResult]:
        """Each set's influence per sample, correlation and susceptibility (and its
        observable-refined LLC from the same draws) over the kept segments
        (:class:`~online_llc.records.ProbeResult`); empty before two segments per chain closed, and after a
        warm-up or a jump of the level until two more have."""
        if self.moments.segments < 2 * self.pooled_chains:  # two per chain: a spread to read
            return {}
        return probe_results(self.moments, self.names, self.sizes, self.nbeta, self.batches.shapes)

    def history(self, name: str) -> List[LLCEstimate]:
        """Every window of probe set ``name``'s observable-refined LLC, oldest first."""
        if name not in self.histories:
            raise KeyError(f"No probe set {name!r}; the sets are {list(self.names)}.")
        return list(self.histories[name])

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Window statistics, filters, histories and the influence's sums (plain values and arrays)."""
        return {
            "names": list(self.names),
            "stats": {n: self.stats[n].state_dict() for n in self.names},
            "filters": {n: self.filters[n].state_dict() for n in self.names},
            "histories": {n: [e.to_dict() for e in h] for n, h in self.histories.items()},
            "window": [self._scalars.copy(), self._vectors.copy()],
            "segment": [self._seg_scalars.copy(), self._seg_vectors.copy(), self._seg_windows],
            "segments": [[np.stack(s) if s else None, np.stack(v) if v else None]
                         for s, v in zip(self.moments._scalars, self.moments._vectors)],
            "blocks": [list(b) for b in self.blocks],
            "kernels": [[m.copy() for m in self._kernels], [m.copy() for m in self._seg_kernels],
                        [[[m.copy() for m in seg] for seg in chain] for chain in self.moments._kernels]],
            "stale": self._stale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same probe sets.

        Raises:
            ValueError: a state of other probe sets.
        """
        if list(state["names"]) != list(self.names):
            raise ValueError(f"Expected a state of the probe sets {self.names}, got {list(state['names'])}.")
        if [tuple(b) for b in state.get("blocks", [])] != self.blocks:
            raise ValueError(f"Expected a state with probe_kernel={bool(self.blocks)} like this monitor's, got the other.")
        for n in self.names:
            self.stats[n].load_state_dict(state["stats"][n])
            self.filters[n].load_state_dict(state["filters"][n])
            self.histories[n] = [LLCEstimate(**e) for e in state["histories"][n]]
        self._scalars, self._vectors = (np.asarray(a, dtype=np.float64).copy() for a in state["window"])
        seg = state["segment"]
        self._seg_scalars, self._seg_vectors = (np.asarray(a, dtype=np.float64).copy() for a in seg[:2])
        self._seg_windows = int(seg[2])
        self.pooled_chains = len(state["segments"])
        self.moments = ProbeMoments(self.pooled_chains, self.num_probes, segment=1, blocks=self.blocks)
        window_k, seg_k, kept_k = state.get("kernels", [[], [], [[] for _ in state["segments"]]])
        self._kernels = [np.asarray(m, dtype=np.float64).copy() for m in window_k]
        self._seg_kernels = [np.asarray(m, dtype=np.float64).copy() for m in seg_k]
        for c, (s, v) in enumerate(state["segments"]):
            for k in range(0 if s is None else len(s)):
                self.moments.add_segment(c, s[k], v[k], kept_k[c][k] if self.blocks else ())
        self._stale = bool(state["stale"])
        self.last = {}
