"""Lab 04's plumbing: the run around the notebook's Ray worker, the Lightning base module,
MLflow tracking and the command line (``python -m labkit.labs.lung_vit``)."""
