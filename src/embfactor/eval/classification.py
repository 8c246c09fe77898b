"""Classification with a linear probe on frozen sentence embeddings (encoders and decoders).

Protocol: texts are embedded (mean-pooled, L2-normalized last hidden states; the base model for decoders), then a
standardized logistic-regression probe (scikit-learn, C=1, lbfgs) is scored by stratified k-fold cross-validation
(k = 5, shuffled with seed 0). Default data: Pang & Lee polarity, 200 sentences (positive / negative); or a user's
CSV/JSONL with ``text`` and ``label`` (``labels_file=``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.eval.embed import pooled_embeddings
from embfactor.eval.similarity import check_texts
from embfactor.eval.registry import register_task

FOLDS = 5
SEED = 0


def probe_accuracy(X: np.ndarray, y: Sequence[Any], *, folds: int = FOLDS, seed: int = SEED, C: float = 1.0) -> list[float]:
    """Accuracy of each fold of a stratified k-fold logistic-regression probe on features ``X``.

    Example:
        >>> X = np.r_[np.zeros((10, 2)), np.ones((10, 2))]; y = [0] * 10 + [1] * 10
        >>> probe_accuracy(X, y)
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    y = np.asarray(list(y))
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise InvalidInputError(f"classification needs at least two different labels, found {sorted(counts)}")
    smallest = min(counts.values())
    if smallest < folds:
        raise InvalidInputError(
            f"the rarest label has {smallest} example(s) but {folds}-fold cross-validation needs at least {folds} "
            f"per label (label counts: {dict(sorted(counts.items()))}); add examples or lower folds"
        )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accs = []
    for train, test in skf.split(X, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        clf.fit(X[train], y[train])
        accs.append(float((clf.predict(X[test]) == y[test]).mean()))
    return accs


@register_task(
    "classification",
    kinds=("encoder", "decoder"),
    description="logistic-regression probe on frozen sentence embeddings, stratified 5-fold accuracy (polarity)",
    metric="accuracy",
)
def classification(
    lm,
    *,
    reference=None,
    texts: Sequence[str] | None = None,
    labels: Sequence[Any] | None = None,
    labels_file: str | Path | None = None,
    folds: int = FOLDS,
    seed: int = SEED,
    C: float = 1.0,
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Probe accuracy (mean ± std over folds) of ``lm``'s sentence embeddings; also the reference's if given.

    Args:
        lm: the model (LoadedModel).
        reference: the original model; adds ``reference_accuracy`` on the same folds.
        texts, labels: data given directly; or ``labels_file`` (CSV/JSONL with text,label); default polarity.
        folds, seed: stratified k-fold settings.
        C: inverse regularization strength of the logistic regression.
        batch_size, max_length: embedding settings.
        progress: progress bars.

    Returns:
        ``accuracy`` (mean), ``accuracy_std``, ``fold_accuracies``, ``n``, ``n_classes``, ``dataset``, ``folds``;
        with a reference also ``reference_accuracy``, ``reference_accuracy_std``, ``accuracy_delta``.

    Example:
        >>> classification(load_model("minilm"))["accuracy"]            # doctest: +SKIP
    """
    from embfactor.data import polarity, read_labelled

    if labels_file is not None:
        if texts is not None or labels is not None:
            raise InvalidInputError("give either labels_file or texts+labels, not both")
        texts, labels = read_labelled(labels_file)
        dataset = str(labels_file)
    elif texts is None and labels is None:
        texts, labels = polarity()
        dataset = "pang_lee_polarity"
    else:
        if texts is None or labels is None:
            raise InvalidInputError("texts and labels must be given together")
        dataset = "given"
    texts = check_texts(texts, "texts")
    labels = list(labels)
    if len(labels) != len(texts):
        raise InvalidInputError(f"{len(texts)} texts but {len(labels)} labels")

    def accuracies(m) -> list[float]:
        X = pooled_embeddings(m, texts, batch_size=batch_size, max_length=max_length, progress=progress).numpy()
        return probe_accuracy(X, labels, folds=folds, seed=seed, C=C)

    accs = accuracies(lm)
    out: dict[str, Any] = {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs,
        "n": len(texts),
        "n_classes": len(set(labels)),
        "dataset": dataset,
        "folds": folds,
    }
    if reference is not None:
        ref = accuracies(reference)
        out.update(
            reference_accuracy=float(np.mean(ref)),
            reference_accuracy_std=float(np.std(ref)),
            accuracy_delta=float(np.mean(accs) - np.mean(ref)),
        )
    return out
