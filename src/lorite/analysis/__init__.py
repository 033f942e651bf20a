"""Analyses of fine-tuned models (Biderman et al., "LoRA Learns Less and Forgets Less", arXiv 2405.09673):

* :mod:`lorite.analysis.spectrum` — the rank needed to explain 90% of the variance of each weight update ΔW;
* :mod:`lorite.analysis.forgetting` — source-domain ability before and after fine-tuning, and the
  learning-vs-forgetting curve.

``lorite analyze spectrum|forgetting`` is the command line for both.
"""
