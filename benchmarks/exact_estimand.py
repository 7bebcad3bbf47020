"""The exact estimand of a known-lambda deep linear network, by Metropolis-adjusted Langevin (MALA).

``estimate_llc`` estimates ``E[nbeta (L_n(w) - L_n(w*))]`` under the localized, tempered posterior
``p(w) ∝ exp(-nbeta L_n(w) - gamma/2 ||w - w*||^2)``. At finite ``nbeta`` and ``gamma > 0`` that
quantity is not ``lambda``: the localization and the finite inverse temperature pull it (for a
regular model by ``gamma / (nbeta h)`` per direction, the closed form of ``benchmarks/heat_grid.py``).
For a singular model there is no closed form, so this script computes it exactly: MALA on the full
batch (float64, step adapted to 60% acceptance during the first fifth of the run, then fixed), whose
chain has that posterior as its stationary law at any step size. Its figure separates the two
questions a known-lambda benchmark mixes: how far the estimand is from ``lambda`` (the estimand's
pull, a choice of ``nbeta`` and ``gamma``), and how far the sampler is from the estimand (heat,
equilibration).

``--compare B`` also runs ``estimate_llc`` at its defaults (2 chains) with batch ``B`` at the same
estimand and prints its ratio to the exact value.

Run: ``python benchmarks/exact_estimand.py --widths 8-8-8-8 --rank 2 --n 100000`` (about 6 minutes
on one core for 20000 MALA steps); ``--nbeta``/``--localization`` for another estimand;
``--widths 6-4 --rank 4 --check-regular`` checks the oracle against the closed form of one linear
layer (Gaussian posterior), centred like the networks at the true parameter.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from online_llc import estimate_llc
from online_llc.config import default_estimand
from online_llc.models.toy import deep_linear_problem


def exact_estimand(widths, rank: int, n: int, nbeta: float, gamma: float, steps: int, seed: int = 0):
    """``(mean, se, quarters, acceptance, step)``: MALA's mean of ``nbeta (L_n(w) - L_n(w*))`` over
    the last four fifths of ``steps``, its batch-means standard error (20 batches), the means of
    the four quarters of those draws (a drift check), the acceptance rate and the final step."""
    p = deep_linear_problem(widths, rank, num_samples=n, batch_size=256, seed=0)
    x, y = (t.double() for t in p.dataset.tensors)
    layers = [m.weight.detach().double().clone() for m in p.model if hasattr(m, "weight")]
    shapes, sizes = [w.shape for w in layers], [w.numel() for w in layers]
    w0 = torch.cat([w.reshape(-1) for w in layers])

    def loss(w: torch.Tensor) -> torch.Tensor:
        out, k = x, 0
        for s, size in zip(shapes, sizes):
            out = out @ w[k : k + size].view(s).T
            k += size
        return 0.5 * ((out - y) ** 2).sum(1).mean()

    l0 = float(loss(w0))

    def energy(w: torch.Tensor):
        w = w.detach().requires_grad_(True)
        lw = loss(w)
        u = nbeta * lw + 0.5 * gamma * ((w - w0) ** 2).sum()
        (g,) = torch.autograd.grad(u, w)
        return float(u.detach()), g, float(lw.detach())

    gen = torch.Generator().manual_seed(seed)
    w = w0.clone()
    u, grad, lw = energy(w)
    eps, accepted, draws, burn = 0.1 / nbeta, 0, [], steps // 5
    for t in range(steps):
        z = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        prop = w - 0.5 * eps * grad + math.sqrt(eps) * z
        u_p, grad_p, l_p = energy(prop)
        forward = float(((prop - w + 0.5 * eps * grad) ** 2).sum()) / (2 * eps)
        backward = float(((w - prop + 0.5 * eps * grad_p) ** 2).sum()) / (2 * eps)
        accept = math.log(float(torch.rand((), generator=gen, dtype=torch.float64))) < -(u_p - u) - backward + forward
        if accept:
            w, u, grad, lw = prop, u_p, grad_p, l_p
        if t < burn:
            eps *= math.exp(0.05 * (float(accept) - 0.6))  # Robbins-Monro towards 60% acceptance
        else:
            accepted += accept
            draws.append(nbeta * (lw - l0))
    d = torch.tensor(draws, dtype=torch.float64)
    per = d.numel() // 20
    batch_means = d[: 20 * per].view(20, per).mean(1)
    q = d.numel() // 4
    quarters = [float(c.mean()) for c in d[: 4 * q].view(4, q)]
    return float(d.mean()), float(batch_means.std() / math.sqrt(20)), quarters, accepted / len(draws), eps, p.lam


def regular_closed_form(widths, n: int, nbeta: float, gamma: float) -> float:
    """The same estimand in closed form for one linear layer (``widths = [a, b]``), centred at the
    true parameter ``w*`` (not the least-squares fit ``w_ls``): the posterior is Gaussian with
    precision ``A = nbeta H + gamma`` and mean ``m = A^-1 (nbeta H w_ls + gamma w*)`` per output
    (``H = X^T X / n``), and ``E[nbeta (L_n(w) - L_n(w*))] = nbeta/2 (tr(H A^-1) + (m - w_ls)^T H
    (m - w_ls) - (w* - w_ls)^T H (w* - w_ls))`` summed over outputs. The MALA oracle must match it."""
    p = deep_linear_problem(widths, min(widths), num_samples=n, batch_size=256, seed=0)
    x, y = (t.double() for t in p.dataset.tensors)
    w_star = p.model[0].weight.detach().double()  # [out, in]
    h = x.T @ x / n
    w_ls = torch.linalg.solve(x.T @ x, x.T @ y).T
    a = nbeta * h + gamma * torch.eye(h.shape[0], dtype=torch.float64)
    a_inv = torch.linalg.inv(a)
    total = 0.0
    for o in range(w_star.shape[0]):
        m = a_inv @ (nbeta * h @ w_ls[o] + gamma * w_star[o])
        dm, ds = m - w_ls[o], w_star[o] - w_ls[o]
        total += 0.5 * nbeta * float(torch.trace(h @ a_inv) + dm @ h @ dm - ds @ h @ ds)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="8-8-8-8")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--nbeta", type=float, default=None, help="default: estimate_llc's default estimand")
    ap.add_argument("--localization", type=float, default=None)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", type=int, default=None, help="also run estimate_llc at this batch size")
    ap.add_argument("--check-regular", action="store_true",
                    help="check the MALA oracle against the closed form on one linear layer (--widths a-b)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    widths = [int(v) for v in args.widths.split("-")]
    nbeta, gamma = default_estimand(args.n, args.nbeta, args.localization)
    t = time.time()
    mean, se, quarters, acc, eps, lam = exact_estimand(widths, args.rank, args.n, nbeta, gamma, args.steps, args.seed)
    print(f"{args.widths} rank {args.rank}, n = {args.n}, nbeta = {nbeta:g}, localization = {gamma:g}: lambda = {lam:g}")
    print(f"exact estimand (MALA, {args.steps} steps, acceptance {acc:.2f}, step * nbeta {eps * nbeta:.3g}): "
          f"{mean:.3f} +- {se:.3f} = {mean / lam:.3f} lambda; quarters {[round(v / lam, 3) for v in quarters]} "
          f"({time.time() - t:.0f} s)")
    if args.check_regular:
        if len(widths) != 2:
            ap.error("--check-regular needs one layer: --widths a-b")
        exact = regular_closed_form(widths, args.n, nbeta, gamma)
        print(f"closed form: {exact:.3f}; MALA / closed form = {mean / exact:.4f} "
              f"({(mean - exact) / se:+.2f} of MALA's standard errors)")
    if args.compare:
        p = deep_linear_problem(widths, args.rank, num_samples=args.n, batch_size=args.compare, seed=0)
        res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=args.n, nbeta=nbeta, localization=gamma,
                           num_chains=2, seed=1)
        print(f"estimate_llc at batch {args.compare}: {res.mean:.3f} +- {res.std:.3f} = {res.mean / mean:.3f} x the exact "
              f"estimand ({res.mean / lam:.3f} lambda), total heat {res.total_heat:.3f}")


if __name__ == "__main__":
    main()
