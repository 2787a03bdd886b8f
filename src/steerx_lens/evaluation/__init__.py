"""Held-out evaluation of steering vectors.

- :mod:`~steerx_lens.evaluation.metrics`: per-token NLL, preference masks, generation scores and
  paired statistics (the measurements);
- :mod:`~steerx_lens.evaluation.experiment`: the SteerX experiment over users, with typed
  per-user records written as ``users/*.json`` and ``metrics.json``;
- :mod:`~steerx_lens.evaluation.report`: ``report.md`` and its plots.
"""
