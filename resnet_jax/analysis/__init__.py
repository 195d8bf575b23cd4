"""Reproducing the paper's experiments: sweep planning/launching, aggregation, figures, Fig. 7.

- `sweep`: plan a grid of (depth, variant, shortcut, seed) runs and launch them as subprocesses.
- `sweep_report`: read the run directories back into summary.json, summary.md and curves.png.
- `paper_numbers`: the numbers of He et al. 2015 that our tables are compared with.
- `responses`: the Fig. 7 analysis (`python -m resnet_jax.analysis.responses --workdir=DIR`).
"""
