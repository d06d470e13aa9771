"""What one lab alone uses: a package per lab where it has several modules."""
