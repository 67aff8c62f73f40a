"""The smallest toy2d run the fault and bad-input tests train: a 2×16 MLP and 8 × 64 statistics.

Each test appends its own `[training]` section (iterations, batch, checkpoint cadence)."""

TINY_TOY2D = """extends = "toy2d"
[run]
name = "tiny"
[student]
hidden = 16
depth = 2
embed_dim = 8
[precond.statistics]
n_points = 8
n_samples = 64
batch_size = 64
"""
