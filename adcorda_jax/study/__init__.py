"""The compression study (arXiv 2401.12014): grid, compression per cell, shift evaluation, findings.

`tasks/compression_study.py` runs it; these modules are usable on their own from a notebook.
"""
