"""Trust the data: what the cached pooled vectors say about the split and the labels.

- :mod:`~transferlab.audit.leaks`: images of a held-out part (val, test) nearly identical to an image of a
  part trained on (cosine similarity of pooled vectors at or above ``audit.leak_threshold``);
- :mod:`~transferlab.audit.labels`: likely label errors, by confident learning (cleanlab) on out-of-fold
  probabilities of a logistic regression on the pooled vectors of train and val;
- :mod:`~transferlab.audit.sheets`: the thumbnail sheets (PNG) of both;
- :mod:`~transferlab.audit.job`: the audit stage's job and ``reports/audit.json``, which ``transferlab audit``
  prints and evaluate reads (test accuracy without the leaked test images).

Nothing is moved or relabelled: the audit reports, people decide. Near-duplicates found by their
perceptual hashes are ingest's (:mod:`transferlab.data.near_dups`); the audit lists them beside its own findings.
"""
