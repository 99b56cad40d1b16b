"""ld3m: latent dataset distillation with diffusion models, at cluster scale."""

__version__ = "0.1.0"
