"""apctl: consistency distillation of EDM teachers with Analytic-Precond."""

__version__ = "0.1.0"
