"""Runnable demos (``online-llc demo NAME`` or ``python demos/NAME.py``).

* ``stagewise`` - :mod:`online_llc.demos.stagewise_dln`: a deep linear network learns in stages.
* ``lightning`` - :mod:`online_llc.demos.lightning_mlp`: the Lightning callback with a CSV logger.
* ``grokking`` - :mod:`online_llc.demos.grokking`: modular addition, memorised then grokked.
* ``groups`` - :mod:`online_llc.demos.groups`: per-module LLC of two blocks that learn at different times.
* ``induction`` - :mod:`online_llc.demos.induction`: a 2-layer attention-only transformer forms induction heads.
* ``probes`` - :mod:`online_llc.demos.probes_dln`: a probe set per teacher mode on the stagewise network.
* ``trainer`` - :mod:`online_llc.demos.trainer_gpt2`: a tiny GPT-2 under the Hugging Face Trainer,
  its bands in TensorBoard and ``online-llc plot``.
"""

from __future__ import annotations

#: demo name -> module that has ``main(argv) -> int``
DEMOS = {
    "stagewise": "online_llc.demos.stagewise_dln",
    "lightning": "online_llc.demos.lightning_mlp",
    "grokking": "online_llc.demos.grokking",
    "groups": "online_llc.demos.groups",
    "induction": "online_llc.demos.induction",
    "trainer": "online_llc.demos.trainer_gpt2",
    "probes": "online_llc.demos.probes_dln",
}
