"""Training: healing a compressed model by distillation from the original (and supervised fine-tuning)."""

from embfactor.train.config import HealConfig
from embfactor.train.heal import heal

__all__ = ["HealConfig", "heal"]
