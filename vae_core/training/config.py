"""Training configuration, validated where it enters the library."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DATA_VARIANTS = ("binarized", "continuous")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the model's shape lives in VAEConfig, kept apart on purpose."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup_epochs: int = 0
    patience: int = 5  # epochs without a better validation -ELBO before stopping; 0 = never
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    data_variant: str = "binarized"  # binarized: resampled every epoch; continuous: grey levels
    eval_batch_size: int = 10_000
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "train.epochs": (self.epochs, self.epochs >= 0, "an integer >= 0"),
            "train.batch_size": (self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            "train.lr": (self.lr, 0 < self.lr <= 1, "a number in (0, 1]"),
            "train.beta": (self.beta, self.beta >= 0, "a number >= 0"),
            "train.warmup_epochs": (self.warmup_epochs, self.warmup_epochs >= 0, "an integer >= 0"),
            "train.patience": (self.patience, self.patience >= 0, "an integer >= 0"),
            "train.data_variant": (
                self.data_variant,
                self.data_variant in DATA_VARIANTS,
                f"one of {DATA_VARIANTS}",
            ),
        }
        for key, (value, ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{key}: expected {allowed}, found {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in fields})
