"""Shared test fixtures."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker takes one core: torch's default of one thread per core would
    # put two threads on every core, and intra-op threads that spin-wait then slow each other down.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded CPU kernels: cheap on a shared machine, and one fixed reduction order.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tensorboard_margins(log_dir: str) -> dict:
    """The Margin charts of the custom-scalars layout written into ``log_dir``'s event files:
    ``{chart title: (value, lower, upper)}``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for event in acc.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        for category in layout.category:
            for chart in category.chart:
                for s in chart.margin.series:
                    out[chart.title] = (s.value, s.lower, s.upper)
    return out
