"""Lab 03's plumbing: the training recipe, the DDP ablation sweep and its command line
(``python -m labkit.labs.ablations``)."""
