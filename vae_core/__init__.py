"""vae_core: the VAE model library. Imports torch, torchvision and numpy only, so it runs on a
bare GPU box; orchestration (Prefect, MLflow, DVC) lives in the `flows` package."""

__version__ = "0.1.0"
