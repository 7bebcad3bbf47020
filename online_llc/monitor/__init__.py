"""The online monitor: co-moving shadow chains -> windows -> filter -> records, beside training.

* :mod:`~online_llc.monitor.estimator` - :class:`OnlineLLC`, the facade that wires the flow;
  :mod:`~online_llc.monitor.settings` - every option (:class:`MonitorSettings`).
* :mod:`~online_llc.monitor.shadow` - the shadow chains in the co-moving frame;
  :mod:`~online_llc.monitor.sketch` - how far the training weights moved between shadow steps.
* :mod:`~online_llc.monitor.warmup` - when a chain's draws may be used.
* :mod:`~online_llc.monitor.window` - windowed statistics (:mod:`~online_llc.monitor.window_state`:
  their checkpoint).
* :mod:`~online_llc.monitor.track` - one tracked quantity's state machine, applying the pure
  decisions of :mod:`~online_llc.monitor.policy` (status, cooling, lag, transitions).
* :mod:`~online_llc.monitor.schedule` and :mod:`~online_llc.monitor.cadence` - when each track
  draws; :mod:`~online_llc.monitor.distributed` - DDP; :mod:`~online_llc.monitor.health` - alarms.
"""

from online_llc.monitor.cadence import Cadence, auto_cadence
from online_llc.monitor.estimator import OnlineLLC
from online_llc.monitor.settings import MonitorSettings
from online_llc.monitor.shadow import ShadowSampler
from online_llc.monitor.track import Track
from online_llc.monitor.window import WindowStats

__all__ = ["Cadence", "MonitorSettings", "OnlineLLC", "ShadowSampler", "Track", "WindowStats", "auto_cadence"]
