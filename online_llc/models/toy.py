"""Models with a known learning coefficient, for validating estimators and choosing settings.

A deep linear network ``f(x) = W_L ... W_1 x`` (no biases) with data ``y = f_{w0}(x) + N(0, s^2 I)``,
``x ~ N(0, I)``, and the per-sample negative log likelihood ``l(w) = ||y - f_w(x)||^2 / (2 s^2)``.
The true parameter ``w0`` is built as an *aligned minimal-rank factorisation*
``W_j = U_{j+1} D_j U_j^T`` with ``U_j`` (``width_j x r``) orthonormal columns and ``D_j`` positive
diagonal, so every layer has rank exactly ``r``. At such a point the local learning coefficient
equals the global one of Aoyagi (2024); at a generic point on the set of true parameters it can be
higher. Reduced-rank regression is the three-width case, and one layer is a regular model
(``lambda = d / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from online_llc.errors import check_nonneg_int, check_positive_float, check_positive_int
from online_llc.models import theory

__all__ = [
    "KnownLambdaProblem",
    "GaussianNLL",
    "ShuffledBatches",
    "RandomBatches",
    "deep_linear_problem",
    "BlockModel",
    "block_problem",
    "StagewiseProblem",
    "stagewise_dln_problem",
]


class ShuffledBatches:
    """A re-iterable of shuffled minibatches ``(x[idx], y[idx])`` with its own generator.

    Each pass reshuffles (like a ``DataLoader`` with ``shuffle=True, drop_last=True``) but slices
    the tensors directly, which is ~10x faster than collating a ``TensorDataset`` item by item
    and never touches the global RNG.

    Args:
        tensors: tensors with the same first dimension.
        batch_size: samples per batch (the last incomplete batch of a pass is dropped).
        seed: seeds the shuffling generator.
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int = 0) -> None:
        check_positive_int("batch_size", batch_size)
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("Expected `tensors` to share their first dimension.")
        if batch_size > n:
            raise ValueError(f"Expected `batch_size` to be at most the number of samples {n}, got {batch_size}.")
        self.tensors = tensors
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.tensors[0].shape[0] // self.batch_size

    def __iter__(self) -> Iterator[Tuple[Tensor, ...]]:
        perm = torch.randperm(self.tensors[0].shape[0], generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield tuple(t[idx] for t in self.tensors)


class RandomBatches(ShuffledBatches):
    """Like :class:`ShuffledBatches`, but every batch is drawn with replacement, independently of
    the others (a pass still holds ``n // batch_size`` batches).

    Why it exists: within a shuffled epoch the batches are disjoint, so the batch an SGLD draw is
    evaluated on holds none of the samples whose gradient noise moved the chain since the epoch
    began. The chain has partly fitted those samples, so its loss on the unseen ones reads high:
    an extra bias, beside the minibatch heat, that no half-batch measurement sees. On linear
    regression at the old fixed step (d = 32, n = 20000, batch 256, ``benchmarks/heat_grid.py``)
    shuffled epochs read 1.444 +- 0.014 of the exact target, independent batches 1.345 +- 0.014
    against the 1.350 the heat predicts. The bias grows with the gradient noise's share of the
    step, so the heat-calibrated defaults keep it small: there the two agreed within 1.3%, inside
    their standard errors of 1.5-3% (d = 12 and 32, n = 2000 and 20000, batches 64 and 256).
    """

    def __iter__(self) -> Iterator[Tuple[Tensor, ...]]:
        n = self.tensors[0].shape[0]
        for _ in range(len(self)):
            idx = torch.randint(0, n, (self.batch_size,), generator=self.generator)
            yield tuple(t[idx] for t in self.tensors)


class GaussianNLL:
    """Per-sample Gaussian negative log likelihood ``||y - model(x)||^2 / (2 s^2)`` (constant dropped).

    Args:
        noise_std: ``s``, the standard deviation of the data noise.
    """

    def __init__(self, noise_std: float = 1.0) -> None:
        self.noise_std = check_positive_float("noise_std", noise_std)

    def __call__(self, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (y - model(x)).pow(2).sum(-1) / self.noise_std**2

    def __repr__(self) -> str:
        return f"GaussianNLL(noise_std={self.noise_std})"


@dataclass
class KnownLambdaProblem:
    """A model at a true parameter, its data, its loss and its theoretical learning coefficient.

    Attributes:
        name: short description, e.g. ``"dln[5, 3, 4, 6, 2] r=1"``.
        model: the network, its weights set to the true parameter.
        loss_fn: per-sample loss (:class:`GaussianNLL`).
        dataset: the ``n`` training samples ``(x, y)``.
        batches: shuffled minibatches of ``dataset`` (:class:`ShuffledBatches`).
        num_samples: ``n``.
        lam: theoretical learning coefficient.
        multiplicity: its multiplicity.
        parts: for a block model, each block's learning coefficient by block name.
    """

    name: str
    model: nn.Module
    loss_fn: GaussianNLL
    dataset: TensorDataset
    batches: ShuffledBatches
    num_samples: int
    lam: float
    multiplicity: int
    parts: Dict[str, float] = field(default_factory=dict)

    def state(self) -> List[Tensor]:
        """Copies of the model's parameters (for checking that an estimator left them alone)."""
        return [p.detach().clone() for p in self.model.parameters()]


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, max(cols, 1), generator=gen))
    return q[:, :cols]


def deep_linear_problem(
    widths: Sequence[int],
    r: int,
    *,
    num_samples: int = 10240,
    batch_size: int = 256,
    noise_std: float = 1.0,
    singular_values: Tuple[float, float] = (0.7, 1.4),
    seed: int = 0,
) -> KnownLambdaProblem:
    """A deep linear network at an aligned rank-``r`` true parameter, with data.

    Args:
        widths: ``[input, hidden..., output]``; two widths make one (regular) linear layer.
        r: rank of every layer of the true parameter (``0 <= r <= min(widths)``).
        num_samples: ``n``, the number of training samples.
        batch_size: batch size of :attr:`KnownLambdaProblem.batches`.
        noise_std: standard deviation of the Gaussian output noise.
        singular_values: range of the diagonal entries of ``D_j`` (drawn uniformly).
        seed: seeds the weights, the data and the loader's shuffling (never the global RNG).

    Returns:
        The problem; ``lam`` comes from :func:`online_llc.models.theory.deep_linear_network`
        (:func:`~online_llc.models.theory.regular` for one layer).
    """
    widths = list(widths)
    if len(widths) == 2:
        check_positive_int("widths[0]", widths[0])
        check_positive_int("widths[1]", widths[1])
        if r != min(widths):
            raise ValueError(f"Expected `r` to be min(widths)={min(widths)} for one layer, got {r!r}.")
        lam, mult = theory.regular(widths[0] * widths[1])
    else:
        lam, mult = theory.deep_linear_network(widths, r)
    check_nonneg_int("r", r)
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed)

    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    model = nn.Sequential(*layers)
    us = [_orthonormal(w, r, gen) for w in widths]
    lo, hi = singular_values
    with torch.no_grad():
        for j, layer in enumerate(layers):
            d = lo + (hi - lo) * torch.rand(r, generator=gen)
            layer.weight.copy_(us[j + 1] @ torch.diag(d) @ us[j].T if r > 0 else torch.zeros_like(layer.weight))
        x = torch.randn(num_samples, widths[0], generator=gen)
        y = model(x) + noise_std * torch.randn(num_samples, widths[-1], generator=gen)
    dataset = TensorDataset(x, y)
    loader = ShuffledBatches(x, y, batch_size=batch_size, seed=seed + 1)
    kind = "linear regression" if len(widths) == 2 else f"dln{widths} r={r}"
    return KnownLambdaProblem(
        name=kind,
        model=model,
        loss_fn=GaussianNLL(noise_std),
        dataset=dataset,
        batches=loader,
        num_samples=num_samples,
        lam=float(lam),
        multiplicity=int(mult),
    )


@dataclass
class StagewiseProblem:
    """A deep linear network trained from a small initialisation on a low-rank teacher.

    Gradient descent from a small initialisation learns the teacher's singular modes one at a
    time, largest first (saddle-to-saddle dynamics; Saxe et al. 2014, Jacot et al. 2021): the
    loss shows a plateau per mode. Each plateau sits near a saddle (the student has rank ``k``
    and the teacher rank ``r > k``), where the LLC estimate is negative; after the last mode the
    student sits at a minimum of rank ``r``, where the learning coefficient is
    ``theory.deep_linear_network(widths, r)``.

    Attributes:
        model: the student, at its small initialisation.
        loss_fn: per-sample Gaussian NLL.
        batches: shuffled minibatches of the training set.
        inputs, targets: the training set.
        num_samples: ``n``.
        widths: the student's widths.
        teacher_singular_values: the teacher's nonzero singular values (largest first).
        lam_final: the learning coefficient at the final minimum.
    """

    model: nn.Module
    loss_fn: GaussianNLL
    batches: ShuffledBatches
    inputs: Tensor
    targets: Tensor
    num_samples: int
    widths: List[int]
    teacher_singular_values: List[float]
    lam_final: float

    def full_loss(self) -> float:
        """Mean training loss over all samples at the model's current weights."""
        with torch.no_grad():
            return float(self.loss_fn(self.model, (self.inputs, self.targets)).mean())

    def learned_singular_values(self) -> List[float]:
        """Singular values of the student's end-to-end map, largest first."""
        with torch.no_grad():
            prod = None
            for layer in self.model:
                prod = layer.weight if prod is None else layer.weight @ prod
            return [float(s) for s in torch.linalg.svdvals(prod)]


def stagewise_dln_problem(
    widths: Sequence[int] = (6, 6, 6, 6),
    singular_values: Sequence[float] = (2.0, 1.0, 0.5),
    *,
    num_samples: int = 10240,
    init_scale: float = 0.02,
    noise_std: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> StagewiseProblem:
    """A student deep linear network at a small random initialisation and a low-rank teacher.

    Args:
        widths: student widths ``[input, hidden..., output]`` (at least three).
        singular_values: the teacher's nonzero singular values; its rank is their count.
        num_samples: training set size ``n``.
        init_scale: std of the student's initial weights.
        noise_std: output noise of the data.
        batch_size: minibatch size.
        seed: seeds teacher, data, initialisation and shuffling (never the global RNG).
    """
    widths = list(widths)
    r = len(singular_values)
    lam, _ = theory.deep_linear_network(widths, r)
    check_positive_float("init_scale", init_scale)
    gen = torch.Generator().manual_seed(seed)
    u = _orthonormal(widths[-1], r, gen)
    v = _orthonormal(widths[0], r, gen)
    teacher = u @ torch.diag(torch.tensor([float(s) for s in singular_values])) @ v.T
    x = torch.randn(num_samples, widths[0], generator=gen)
    y = x @ teacher.T + noise_std * torch.randn(num_samples, widths[-1], generator=gen)
    model = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])])
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(init_scale * torch.randn(layer.weight.shape, generator=gen))
    return StagewiseProblem(
        model=model,
        loss_fn=GaussianNLL(noise_std),
        batches=ShuffledBatches(x, y, batch_size=batch_size, seed=seed + 1),
        inputs=x,
        targets=y,
        num_samples=num_samples,
        widths=widths,
        teacher_singular_values=[float(s) for s in singular_values],
        lam_final=float(lam),
    )


class BlockModel(nn.Module):
    """Independent sub-networks side by side: the input is split by the blocks' input widths,
    each block maps its own slice, and the outputs are concatenated. With a loss that sums over
    outputs the blocks are statistically independent, so learning coefficients add (the
    whole model's is the sum of the blocks')."""

    def __init__(self, blocks: Mapping[str, nn.Module], in_widths: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(blocks)
        self.in_widths = list(in_widths)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        parts = torch.split(x, self.in_widths, dim=-1)
        return torch.cat([block(p) for block, p in zip(self.blocks.values(), parts)], dim=-1)


def block_problem(
    blocks: Mapping[str, Tuple[Sequence[int], int]],
    *,
    num_samples: int = 10240,
    batch_size: int = 256,
    seed: int = 0,
) -> KnownLambdaProblem:
    """Deep linear networks side by side on separate inputs and outputs (block-diagonal truth).

    Args:
        blocks: ``{name: (widths, r)}``, each built as :func:`deep_linear_problem` builds it.
        num_samples, batch_size, seed: as in :func:`deep_linear_problem` (block ``i`` uses seed
            ``seed + 10 * i``).

    Returns:
        The problem: ``lam`` is the sum of the blocks', ``parts`` each block's; block ``name``'s
        parameters are ``blocks.<name>.*``.
    """
    probs = {
        name: deep_linear_problem(widths, r, num_samples=num_samples, batch_size=batch_size, seed=seed + 10 * i)
        for i, (name, (widths, r)) in enumerate(blocks.items())
    }
    model = BlockModel({n: p.model for n, p in probs.items()}, [p.dataset.tensors[0].shape[1] for p in probs.values()])
    x = torch.cat([p.dataset.tensors[0] for p in probs.values()], dim=1)
    y = torch.cat([p.dataset.tensors[1] for p in probs.values()], dim=1)
    parts = {n: p.lam for n, p in probs.items()}
    return KnownLambdaProblem(
        name="blocks " + " + ".join(f"{n}: {p.name}" for n, p in probs.items()),
        model=model,
        loss_fn=GaussianNLL(1.0),
        dataset=TensorDataset(x, y),
        batches=ShuffledBatches(x, y, batch_size=batch_size, seed=seed + 1),
        num_samples=num_samples,
        lam=float(sum(parts.values())),
        multiplicity=1,
        parts=parts,
    )
