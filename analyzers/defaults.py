"""The fixed values of the evaluation settings (analyzers/settings): the built-in tasks' default
datasets, the tag schemes, the probe choices and the bootstrap's resamples.

A leaf, torch-free: the settings read them to declare their fields and flags, and the evaluation
code (analyzers/quality, which re-exports them) to do its work, without either importing the other."""
from __future__ import annotations

# the built-in tasks' Hugging Face datasets when no file is given (quality/tasks.py declares the tasks)
DEFAULT_DATA = {"lm": "wikitext:wikitext-2-raw-v1", "cls": "glue:sst2", "tok": "conll2003", "qa": "squad"}
TAG_SCHEMES = ("auto", "iob1", "iob2", "iobes", "plain")   # tok tags (quality/metrics)
PROBE_CHOICES = ("auto", "always", "never")                # own head or probe (quality/registry)
RESAMPLES = 1000                                           # paired bootstrap resamples (quality/bootstrap)
