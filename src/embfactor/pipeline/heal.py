"""heal: load a compressed model and its original by name, heal the one against the other, save the best."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def heal(
    compressed: str | Any,
    reference: str | Any,
    output: str | Path,
    *,
    text_files: list[str] | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    labels: str | None = None,
    progress: bool = True,
    verify: int | bool | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """Heal the compressed model ``compressed`` against the original ``reference``; write the best to ``output``.

    Inputs (text files, labels, output folder) are validated before the models are loaded, and nothing is
    written when anything is wrong. The final save is verified (:mod:`embfactor.verify`).

    Args:
        compressed: an embfactor output folder (or a LoadedModel of one, trained in place).
        reference: the original model: a name (``minilm``), a folder, or a LoadedModel.
        output: the folder for the healed model and its resume state.
        text_files: training text files (default: the bundled Wikipedia extract's training part).
        minutes, steps: the budget (at least one).
        labels: a CSV/JSONL of ``text,label``: supervised fine-tuning with a classification head.
        verify: samples of the check of the written model (None: default; 0: skip).
        opts: any :class:`embfactor.train.config.HealConfig` field (lr, batch_size, train_all, ...).

    Returns:
        The summary dict (steps, seconds, eval before/best, ``verified``, ``output``).

    Example:
        >>> import embfactor as ef
        >>> r = ef.heal("out/minilm-8x", "minilm", "out/minilm-8x-healed", minutes=10)   # doctest: +SKIP
        >>> r["verified"]["measured"]["fidelity"]                                           # doctest: +SKIP
        0.999...
    """
    from embfactor.data import read_labelled, read_texts
    from embfactor.errors import ConfigError
    from embfactor.fileio import check_output_dir
    from embfactor.models import LoadedModel, load_model, source_path
    from embfactor.train.config import HealConfig
    from embfactor.train.heal import heal as heal_run

    texts = read_texts(text_files) if text_files else None
    if labels is not None:
        read_labelled(labels)  # fail on a bad labels file before loading anything
    loaded = [m if isinstance(m, LoadedModel) else None for m in (compressed, reference)]
    check_output_dir(output, inputs=tuple(m.source if m is not None else source_path(n)
                                          for m, n in zip(loaded, (compressed, reference))))
    if minutes is None and steps is None:
        raise ConfigError("give --minutes M or --steps N")
    HealConfig.from_options(minutes=minutes, steps=steps, **opts)  # budget and options, before the models load
    student = loaded[0] or load_model(compressed)
    teacher = loaded[1] or load_model(reference)
    return heal_run(student, teacher, texts=texts, minutes=minutes, steps=steps, output=output, labels=labels,
                progress=progress, verify=verify, **opts)


__all__ = ["heal"]
