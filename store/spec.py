"""What a Reaction pass computes: one value object shared by every place that records it.

The results file's settings (``/reaction/<split>`` attributes), the ONNX contract (the graph's
metadata), ``analyzer reaction``, ``analyzer cam`` and ``analyzer export-onnx`` all describe the
computation with a :class:`ReactionSpec`, so a setting is named, checked and stored in one place.
It lives in ``store`` because files record it; it holds no tensors and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from store.errors import InputError

SCORES = ("logit", "softmax")  # y^c: the pre-softmax logit (thesis eq. 3.1) or its probability
TARGETS = ("label", "pred")  # c: the image's true class or the predicted one
WEIGHTINGS = ("gradcam",)  # the channel weights alpha_k: Grad-CAM's mean gradient
SPEC_KEYS = ("layer", "score", "target", "weighting")


@dataclass(frozen=True)
class ReactionSpec:
    """Layer, score, target and CAM weighting of a Reaction computation (docs/METHOD.md §2).

    Attributes:
        layer: qualified name of the Grad-CAM layer (``model.named_modules()``).
        score: ``"logit"`` (default) or ``"softmax"``.
        target: ``"label"`` (the true class, default) or ``"pred"`` (the predicted class).
        weighting: how the channel weights are computed; ``"gradcam"`` only, for now.
    """

    layer: str
    score: str = "logit"
    target: str = "label"
    weighting: str = "gradcam"

    def __post_init__(self) -> None:
        for name, allowed in (("score", SCORES), ("target", TARGETS),
                              ("weighting", WEIGHTINGS)):
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.layer:
            raise InputError("the Grad-CAM layer name is empty")

    def attributes(self) -> dict[str, str]:
        """The spec as string attributes (HDF5 group attributes, ONNX metadata entries)."""
        return asdict(self)

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, object]) -> ReactionSpec:
        """Inverse of :meth:`attributes`; files written before ``weighting`` existed are
        Grad-CAM."""
        values = {key: str(attributes[key]) for key in SPEC_KEYS if key in attributes}
        values.setdefault("weighting", "gradcam")
        return cls(**values)

    def differences(self, other: ReactionSpec) -> list[tuple[str, str, str]]:
        """``(setting, self's value, other's value)`` for every setting that differs."""
        return [(key, getattr(self, key), getattr(other, key)) for key in SPEC_KEYS
                if getattr(self, key) != getattr(other, key)]
