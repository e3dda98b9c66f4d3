"""The patching rule as one frozen record: which mode, which numbers, validated once.

`PatchingRule` is what every user of patching holds: the numpy patcher (`offline`), its traced
twin (`traced`), the one-decision-at-a-time rule of decoding (`incremental`), the data pipeline
and the config validation (`bltjax.config`). Build it from keywords (`PatchingRule(mode=...)`
or `from_kwargs`) or from an experiment config (`from_config(config.patching)`); a bad value
raises `PatchingError` naming the field (``patching.threshold``) and the expected value.

The modes of docs/architecture.md §3, and the `kind` each combination of fields selects:

* ``byte`` (§3.10): every token is a patch. Takes no number.
* ``static`` (§3.9): patches of ``patch_size`` tokens, after a first patch of one token unless
  ``static_first_patch_rule=False`` (the BLT decoder needs that first patch, §8.2).
* ``space`` (§3.8): a patch starts after every word end.
* ``entropy``: ``threshold`` -> ``global`` (§3.4); + ``monotonicity`` -> ``monotonic`` (§3.5);
  + ``threshold_add`` -> ``combined`` (§3.6, ``reference_quirks`` forbids a start at position 3
  as the official code does); no threshold and ``patch_size`` -> ``topk`` (§3.7).
* ``max_patch_length`` (§3.12) splits every patch from its start, in any mode.
* ``entropy_float16`` rounds entropies through float16 before comparing them, as training on
  float16 sidecars does; the default compares float32 entropies, as in-forward patching does.
* ``entropy_reset_on_newline`` says how the entropies were computed, not how they are compared:
  the entropy model's context restarts after every newline byte (docs/architecture.md §2.5). The
  patchers take the entropies as given; the data pipeline checks that the sidecars were computed
  that way, and generation's cached entropy model resets its context the same way.

Nothing here imports jax, so data-loader workers can hold rules.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from bltjax.tokenizer import OFFSET, VOCAB_SIZE

MODES = ("entropy", "space", "static", "byte", "bpe")  # bpe: after each BPE delimiter id 3 (§3.11)
_FLAGS = ("monotonicity", "reference_quirks", "static_first_patch_rule", "entropy_float16", "entropy_reset_on_newline")
KINDS = ("byte", "static", "space", "bpe", "global", "monotonic", "combined", "topk")


class PatchingError(ValueError):
    """A patching rule or argument that cannot work; `field` is what it names (``patching.mode``)."""

    def __init__(self, field: str, expected: str, got: Any) -> None:
        super().__init__(f"{field}: expected {expected}, got {got!r}")
        self.field, self.expected, self.got = field, expected, got


def _space_like_table() -> np.ndarray:
    """space_like(id) of §3.8 for all ids: not an ASCII letter/digit, not a continuation byte."""
    byte = np.arange(VOCAB_SIZE) - OFFSET  # negative for special tokens
    word = (
        ((byte >= 48) & (byte <= 57))  # 0-9
        | ((byte >= 65) & (byte <= 90))  # A-Z
        | ((byte >= 97) & (byte <= 122))  # a-z
        | ((byte >= 128) & (byte <= 191))  # UTF-8 continuation bytes
    )
    return ~word


SPACE_LIKE = _space_like_table()
SPACE_LIKE.flags.writeable = False


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    """An int, or a float with an integral value (configs write 4.0 for 4 bytes)."""
    return _is_real(value) and math.isfinite(value) and float(value).is_integer()


@dataclasses.dataclass(frozen=True)
class PatchingRule:
    """How a BLT places patch boundaries (module docstring). Frozen and hashable, so that its
    structure (`static_part`) can be a static argument of `jax.jit`."""

    mode: str
    threshold: float | None = None
    threshold_add: float | None = None
    monotonicity: bool = False
    patch_size: float | None = None
    max_patch_length: int | None = None
    reference_quirks: bool = False
    static_first_patch_rule: bool = True
    entropy_float16: bool = False
    entropy_reset_on_newline: bool = False

    def __post_init__(self) -> None:
        self._validate()
        # Normalised once here (object.__setattr__: the record is frozen) so that equal rules
        # compare and hash equal whichever number types they were written with.
        normal = {
            "threshold": None if self.threshold is None else float(self.threshold),
            "threshold_add": None if self.threshold_add is None else float(self.threshold_add),
            "max_patch_length": None if self.max_patch_length is None else int(self.max_patch_length),
            "patch_size": self.patch_size if self.patch_size is None else float(self.patch_size),
        }
        if self.mode == "static":
            normal["patch_size"] = int(self.patch_size)
        for name in _FLAGS:
            normal[name] = bool(getattr(self, name))
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def _validate(self) -> None:
        def fail(name: str, expected: str) -> PatchingError:
            return PatchingError(f"patching.{name}", expected, getattr(self, name))

        if self.mode not in MODES:
            raise fail("mode", f"one of {MODES}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise fail(name, "a bool")
        length = self.max_patch_length
        if length is not None and not (_is_whole(length) and length >= 1):
            raise fail("max_patch_length", "None or an int >= 1")
        for name in ("threshold", "threshold_add"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or math.isnan(value)):
                raise fail(name, "None or a real number (not NaN)")
        if self.mode != "entropy":
            unset_fields = (("threshold", None), ("threshold_add", None), ("monotonicity", False))
            for name, unset in (*unset_fields, ("entropy_reset_on_newline", False)):
                if getattr(self, name) != unset:
                    raise fail(name, f"{unset} when patching.mode={self.mode!r} (only entropy patching uses it)")
        if self.mode == "static":
            if not (_is_whole(self.patch_size) and self.patch_size >= 1):
                raise fail("patch_size", "a whole number >= 1 when patching.mode='static'")
        elif self.mode in ("space", "byte", "bpe"):
            if self.patch_size is not None:
                raise fail("patch_size", f"None when patching.mode={self.mode!r}")
        elif self.threshold is None:  # top-k entropy patching
            if self.threshold_add is not None or self.monotonicity:
                raise fail("threshold", "set when threshold_add or monotonicity is used (top-k takes neither)")
            if not (_is_real(self.patch_size) and self.patch_size > 0):
                raise fail("patch_size", "a number > 0 for top-k entropy patching (no threshold)")
        else:
            if self.patch_size is not None:
                raise fail("patch_size", "None when an entropy threshold is given")
            if self.monotonicity and self.threshold_add is not None:
                raise fail("threshold_add", "None when monotonicity=True (§3.5 has one threshold)")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_kwargs(cls, **fields: Any) -> PatchingRule:
        """The rule of these keyword fields; an unknown name raises PatchingError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in fields:
            if name not in known:
                raise PatchingError(f"patching.{name}", f"one of the fields {sorted(known)}", "an unknown field")
        if "mode" not in fields:
            raise PatchingError("patching.mode", f"one of {MODES}", None)
        return cls(**fields)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> PatchingRule:
        """The rule of an experiment config: its ``patching`` field, or that field itself (a
        ConfigDict or a mapping), or another rule. ``overrides`` replace fields.

        In a config, ``patching.patch_size`` is also the expected mean patch size (FLOP estimates,
        sweeps), so it is checked to be None or > 0 in every mode but kept only where the rule
        uses it: static patching and top-k entropy patching.
        """
        if isinstance(config, PatchingRule):
            return cls.from_kwargs(**{**config.patching_kwargs(), **overrides})
        patching = config.get("patching", config) if _has_get(config) else getattr(config, "patching", config)
        if not _has_get(patching):
            raise PatchingError("patching", "a ConfigDict or mapping of the patching fields", type(patching).__name__)
        names = [f.name for f in dataclasses.fields(cls)]
        fields = {name: patching.get(name) for name in names if patching.get(name) is not None}
        fields.update(overrides)
        size = fields.get("patch_size")
        if size is not None and not (_is_real(size) and size > 0):
            raise PatchingError("patching.patch_size", "None or a number > 0 (the target mean patch size)", size)
        mode = fields.get("mode")
        uses_size = mode == "static" or (mode == "entropy" and fields.get("threshold") is None)
        if not uses_size and "patch_size" not in overrides:
            fields.pop("patch_size", None)
        return cls.from_kwargs(**fields)

    # --- what the rule is -----------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """One of KINDS: the concrete rule the fields select (module docstring)."""
        if self.mode != "entropy":
            return self.mode
        if self.threshold is None:
            return "topk"
        if self.monotonicity:
            return "monotonic"
        return "combined" if self.threshold_add is not None else "global"

    @property
    def needs_entropy(self) -> bool:
        return self.mode == "entropy"

    @property
    def forced_starts(self) -> int:
        """Dynamic modes: positions 0..forced_starts-1 always start a patch (§3.2, §3.5, §3.6)."""
        return 3 if self.kind in ("monotonic", "combined") else 2

    def top_k_count(self, n: int) -> int:
        """Top-k: starts chosen after the forced two, for n = floor(N / s) patches (§3.7)."""
        return max(math.floor(n / self.patch_size) - 2, 0)

    def patching_kwargs(self) -> dict[str, Any]:
        """Every field as keywords: ``PatchingRule(**rule.patching_kwargs()) == rule``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check_entropies_given(self, given: bool) -> None:
        """Entropy patching needs entropies; every other mode refuses them (they would be ignored)."""
        if given != self.needs_entropy:
            expected = "a float array [B, N] (nats)" if self.needs_entropy else "None"
            got = "<array>" if given else None
            raise PatchingError("entropies", f"{expected} when patching.mode={self.mode!r}", got)

    # --- the split a compiled program needs: structure (static) and numbers (traced) ---------------

    def static_part(self) -> PatchingRule:
        """The rule with its numbers replaced by placeholders: what fixes a compiled program's
        shapes and branches. Top-k keeps its patch size, which fixes how many starts are chosen."""
        return dataclasses.replace(
            self,
            threshold=None if self.threshold is None else 0.0,
            threshold_add=None if self.threshold_add is None else 0.0,
            patch_size=1 if self.mode == "static" else self.patch_size,
            max_patch_length=None,  # values()[3]; 0 = no split
        )

    def values(self, dtype: Any = np.float32) -> np.ndarray:
        """[4] of `dtype`: threshold, threshold_add, static patch size, max_patch_length (0 = unset)."""
        parts = (
            self.threshold,
            self.threshold_add,
            self.patch_size if self.mode == "static" else None,
            self.max_patch_length,
        )
        return np.array([0.0 if v is None else v for v in parts], dtype)


def _has_get(value: Any) -> bool:
    return isinstance(value, Mapping) or callable(getattr(value, "get", None))


def resolve(rule: PatchingRule | None, fields: Mapping[str, Any]) -> PatchingRule:
    """The rule a public function was given: a PatchingRule, or its fields as keywords."""
    if rule is None:
        return PatchingRule.from_kwargs(**fields)
    if not isinstance(rule, PatchingRule):
        raise PatchingError("rule", "a PatchingRule (or its fields as keywords)", type(rule).__name__)
    if fields:
        raise PatchingError("rule", "either a PatchingRule or its fields as keywords, not both", sorted(fields))
    return rule
