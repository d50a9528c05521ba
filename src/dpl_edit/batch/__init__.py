"""Datasets in PIE-Bench's layout: reading and writing them (:mod:`.piebench`), editing every item
with several methods, resumably and across processes (:mod:`.runner`), and PIE-Bench's metrics
(:mod:`.metrics`)."""
