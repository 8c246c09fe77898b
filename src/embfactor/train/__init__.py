"""Training: healing a compressed model by distillation from the original (and supervised fine-tuning)."""

from embfactor.train.heal import heal

__all__ = ["heal"]
