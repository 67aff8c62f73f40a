"""Sample-quality and trajectory metrics."""
