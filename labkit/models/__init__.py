"""Models used by the labs."""
