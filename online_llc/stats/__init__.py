"""Pure statistics of draws (numpy only): window summaries, Monte Carlo standard errors, the filter.

* :mod:`~online_llc.stats.draws` - one window's summary of the chains' draws, the heat ratio.
* :mod:`~online_llc.stats.mcse` - autocorrelation-aware standard errors and effective sample sizes.
* :mod:`~online_llc.stats.filter` - the state-space filter of the LLC over training steps.
"""

from online_llc.stats.draws import WindowSummary, heat_ratio, summarize
from online_llc.stats.filter import FilterInfo, LLCFilter
from online_llc.stats.mcse import effective_sample_size, mean_standard_error, multichain_standard_error

__all__ = [
    "FilterInfo",
    "LLCFilter",
    "WindowSummary",
    "effective_sample_size",
    "heat_ratio",
    "mean_standard_error",
    "multichain_standard_error",
    "summarize",
]
