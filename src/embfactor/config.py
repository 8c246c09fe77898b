"""FactorizationConfig: what to factorize and how, validated on creation and saved as versioned JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from embfactor.errors import ConfigError, CorruptFileError

CONFIG_FORMAT_VERSION = 1
# how a compressed model stores the weights besides its embedding (``compress --rest``; embfactor.surgery.rest): here,
# without torch, so that the CLI's parser lists them
REST_CHOICES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")
# the metric the planner (method "auto") measures a table's error in: "input" (the Fisher of the input embedding
# vectors), "head" (a tied head's H), both, "plain" squared error, or "auto" (input, plus head for a tied decoder)
PLAN_METRICS = ("auto", "plain", "input", "head", "input+head")
# the planner's options (``--method-option`` of method "auto", or of a size with no method)
PLAN_OPTIONS = ("formats", "metric", "head_metric", "predicted_counts", "ridge")
# the input metric's default blend toward plain squared error of the same trace: F + 0.3·tr(F)/d·I
INPUT_RIDGE = 0.3


@dataclass
class FactorizationConfig:
    """How to factorize a model's token embedding.

    Args:
        method: a registered decomposition name (``embfactor.available_methods()``), or ``"auto"``: the byte-budget
            planner (:mod:`embfactor.plan`, tiers of formats by token frequency; needs ``size``); ``None`` picks the best
            default for the matrix shape.
        rank, ratio, energy, max_error, size: exactly one target (see :func:`embfactor.decomposition.resolve_rank`);
            ``size`` is a byte target, "16x" (x fewer embedding bytes than fp32) or "2.5MB", for which the
            method picks its settings (rank, sub-vector width, stages, bits) to fit. No target is needed when
            ``method_options`` fix the size on their own (``bits`` for int, ``sub_dim``/``M`` for pq, ``stages``/
            ``sub_dim``/``M`` for rvq, ``tt_rank`` for tt); a rank, ratio or size given with them must allow the
            bytes they store (checked on the table's shape); energy/max_error with them are refused when compressing.
        seed: seed for randomized methods; results are deterministic given it.
        method_options: extra keyword arguments passed to the method (e.g. ``{"power_iters": 6}`` for rsvd).
        factorize_head: when the output head is tied to the input embedding, share the factors with it.

    Example:
        >>> FactorizationConfig(ratio=6, method="svd").rank is None
        True
        >>> FactorizationConfig(method="int", method_options={"bits": 4, "group": 32}).ratio is None   # bits fix it
        True
    """

    method: str | None = None
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    max_error: float | None = None
    size: str | None = None
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    factorize_head: bool = True

    def __post_init__(self) -> None:
        # imported here, not at the top: the CLI imports this module to parse flags, before torch is needed
        from embfactor.decomposition import fixes_size, get_method, missing_target_message, validate_target

        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        targets = {"rank": self.rank, "ratio": self.ratio, "energy": self.energy, "max_error": self.max_error,
                   "size": self.size}
        given = {k: v for k, v in targets.items() if v is not None}
        fixed = self.method not in (None, "auto") and fixes_size(self.method, self.method_options)
        if not given and not fixed and self.method != "auto":  # auto explains its own need (a size)
            raise ConfigError(missing_target_message(self.method))
        if given:
            # energy/max_error with options that fix the size are refused where a table is compressed (before the
            # load in pipeline.compress), not here: folders saved with them by earlier versions must still load
            validate_target(self.rank, self.ratio, self.energy, self.max_error, self.size)
        if self.method == "auto" or (self.method is None and self.size is not None):
            # the byte-budget planner (embfactor.plan): tiers of formats chosen on the model, for a size target (a
            # size with no method is the planner too: its options are checked here, before any model loads)
            if self.size is None:
                raise ConfigError("method 'auto' plans for a byte target: give size ('16x' or '2.5MB'), not a rank")
            unknown = sorted(set(self.method_options) - set(PLAN_OPTIONS))
            if unknown:
                raise ConfigError(f"unknown option(s) {', '.join(unknown)} for method 'auto'; its options: "
                                  f"{', '.join(PLAN_OPTIONS)}")
            ridge = self.method_options.get("ridge", INPUT_RIDGE)
            if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
                raise ConfigError(f"ridge (the input metric's blend toward plain error, F + ridge·tr(F)/d·I) must be a "
                                  f"number >= 0, got {ridge!r}")
            if self.method_options.get("metric", "auto") not in PLAN_METRICS:
                raise ConfigError(f"metric must be one of {', '.join(PLAN_METRICS)}, got "
                                  f"{self.method_options['metric']!r}")
            for flag in ("head_metric", "predicted_counts"):
                if not isinstance(self.method_options.get(flag, True), bool):
                    raise ConfigError(f"{flag} must be true or false, got {self.method_options[flag]!r}")
        elif self.method is not None:
            # UnknownMethodError listing the valid names; ConfigError naming an option the method does not take
            get_method(self.method).check_options(self.method_options)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        from embfactor import __version__

        d = dataclasses.asdict(self)
        d["format_version"] = CONFIG_FORMAT_VERSION
        d["embfactor_version"] = __version__
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> FactorizationConfig:
        if not isinstance(d, dict):
            raise CorruptFileError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != CONFIG_FORMAT_VERSION:
            raise CorruptFileError(
                f"{source}: format_version {version!r} is not supported (this embfactor reads {CONFIG_FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"format_version", "embfactor_version"}
        if unknown:
            raise CorruptFileError(f"{source}: unknown fields {sorted(unknown)}; known fields are {sorted(names)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ConfigError as e:
            raise CorruptFileError(f"{source}: {e}") from e
