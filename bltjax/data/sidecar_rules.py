"""Which entropy patching rules the start-bit sidecars hold: tags, manifest records, per-document masks.

    from bltjax.data import sidecar_rules
    rule = PatchingRule(mode="entropy", threshold=0.3, monotonicity=True)
    sidecar_rules.rule_tag(rule)                                    # "m0.3"
    mask = sidecar_rules.document_start_mask(tokens, offsets, entropies, rule)   # bool [T]

A start-bit sidecar (`bltjax.data.sidecars`, docs/data.md) holds, for one rule, the natural patch
starts of every document: `patching.patch_start_mask(document, rule, include_next_token=False)`
of each document alone. What that means per kind (docs/architecture.md §3):

* ``global`` (§3.4), ``monotonic`` (§3.5), ``combined`` (§3.6, ``reference_quirks`` included: it
  forbids a start at position 3 of every document). These look back at most two entropies, so
  the mask is computed in one vectorised pass over the concatenated shard and then positions
  0..forced_starts-1 of every document are forced (and position 3 cleared under the quirk):
  exactly the per-document mask.
* ``topk`` (§3.7): per document of N tokens, n = floor(N / patch_size) patches, i.e. the
  floor(N / s) - 2 candidates 2..N-1 with the largest H_{p-1} start a patch, ties to the earlier
  position. k depends on the document, so the numpy patcher runs on each document alone
  (documents of equal length batched together).
* ``max_patch_length`` (§3.12) is not stored: it splits patches from their starts, so the data
  pipeline applies it to each row's lengths at batch time, and one sidecar serves every
  ``max_patch_length`` (``split_long_patches`` of a document's sidecar lengths equals the
  patcher's lengths with it; tests/test_sidecar_modes.py). ``entropy_float16`` changes nothing
  (the entropies are float16 already).
* ``entropy_reset_on_newline`` (§2.5) changes the entropies, not the rule: it is recorded in the
  ``entropy_model`` identity of ``sidecars.json`` and checked by `check_reset`.

Tags name the stored rule in file names and in ``sidecars.json``: ``t{θ}`` global (the historical
threshold tag), ``m{θ}`` monotonic, ``c{θ}_{θ_add}`` combined (``cq...`` with reference_quirks),
``k{s}`` top-k. Thresholds are written as the shortest repr of their float32 value (the patcher
compares float32), patch sizes as the repr of the float64 (floor(N / s) is taken in float64), so
equal tags mean bit-identical masks.

numpy only (no jax), so data-loader workers may import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bltjax.patching import PatchingError, PatchingRule, patch_start_mask
from bltjax.tokenizer import OFFSET

ENTROPY_KINDS = ("global", "monotonic", "combined", "topk")
NEWLINE_ID = ord("\n") + OFFSET  # the token id of the byte 0x0A
_RULE_FIELDS = ("threshold", "threshold_add", "reference_quirks", "patch_size")


class SidecarRuleError(ValueError):
    """A rule the sidecars cannot hold, or a manifest that does not hold the rule asked for."""


def _float32_repr(value: Any, field: str) -> str:
    number = float(value)
    if not math.isfinite(number):
        raise SidecarRuleError(f"{field}: expected a finite number, got {value!r}")
    return str(np.float32(number))


def stored_rule(rule: PatchingRule) -> PatchingRule:
    """The rule whose bits a sidecar stores for `rule`: its natural starts only (module docstring)."""
    if not isinstance(rule, PatchingRule) or rule.mode != "entropy":
        got = rule.mode if isinstance(rule, PatchingRule) else type(rule).__name__
        raise SidecarRuleError(f"config.patching.mode: expected 'entropy' for start-bit sidecars, got {got!r}")
    kind = rule.kind
    return PatchingRule(
        mode="entropy",
        threshold=rule.threshold,
        threshold_add=rule.threshold_add,
        monotonicity=rule.monotonicity,
        patch_size=rule.patch_size if kind == "topk" else None,
        reference_quirks=rule.reference_quirks and kind == "combined",
    )


def rule_tag(rule: PatchingRule) -> str:
    """The file tag of a rule's sidecar (module docstring)."""
    rule = stored_rule(rule)
    kind = rule.kind
    if kind == "topk":
        return "k" + repr(float(rule.patch_size))
    threshold = _float32_repr(rule.threshold, "threshold")
    if kind == "global":
        return "t" + threshold
    if kind == "monotonic":
        return "m" + threshold
    prefix = "cq" if rule.reference_quirks else "c"
    return f"{prefix}{threshold}_{_float32_repr(rule.threshold_add, 'threshold_add')}"


def rule_record(rule: PatchingRule) -> dict[str, Any]:
    """The ``sidecars.json`` record of a rule: its kind and the fields that define it."""
    rule = stored_rule(rule)
    return {"kind": rule.kind, **{name: getattr(rule, name) for name in _RULE_FIELDS}}


def rule_of_record(record: Mapping[str, Any], where: str) -> PatchingRule:
    """The stored rule a manifest record describes (`where` names it in errors)."""
    if not isinstance(record, Mapping) or record.get("kind") not in ENTROPY_KINDS:
        got = record.get("kind") if isinstance(record, Mapping) else record
        raise SidecarRuleError(f"{where}: field 'kind': expected one of {ENTROPY_KINDS}, got {got!r}")
    kind = record["kind"]
    fields: dict[str, Any] = {"mode": "entropy", "threshold": record.get("threshold")}
    if kind == "monotonic":
        fields["monotonicity"] = True
    elif kind == "combined":
        fields["threshold_add"] = record.get("threshold_add")
        fields["reference_quirks"] = bool(record.get("reference_quirks", False))
    elif kind == "topk":
        fields = {"mode": "entropy", "patch_size": record.get("patch_size")}
    try:
        return PatchingRule(**fields)
    except PatchingError as error:
        raise SidecarRuleError(f"{where}: {error}") from error


def listed_rules(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """tag -> record of every rule a ``sidecars.json`` lists: ``thresholds`` (global) and ``rules``."""
    listed = {}
    for tag, entry in (manifest.get("thresholds") or {}).items():
        entry = entry if isinstance(entry, Mapping) else {}
        listed[tag] = {"kind": "global", "threshold": entry.get("threshold"), "calibration": entry.get("calibration")}
    listed.update(manifest.get("rules") or {})
    return listed


def describe(rule: PatchingRule) -> str:
    """A rule in words, with the config fields that define it."""
    rule = stored_rule(rule)
    kind = rule.kind
    if kind == "global":
        return f"threshold {rule.threshold!r}"
    if kind == "monotonic":
        return f"the monotonic rule (monotonicity=True, threshold {rule.threshold!r})"
    if kind == "combined":
        quirks = ", reference_quirks=True" if rule.reference_quirks else ""
        return f"the combined rule (threshold {rule.threshold!r}, threshold_add {rule.threshold_add!r}{quirks})"
    return f"top-k (no threshold, patch_size {rule.patch_size!r})"


def entropy_command(data_dir: Any, rule: PatchingRule, reset_on_newline: bool, entropy_model: str | None) -> str:
    """The `python -m bltjax.entropy` command line that computes the sidecars of `rule`."""
    rule = stored_rule(rule)
    parts = ["python -m bltjax.entropy", f"--data {data_dir}", f"--entropy-model {entropy_model or 'ENTROPY_MODEL'}"]
    kind = rule.kind
    if kind != "global":
        parts.append(f"--rule {kind}")
    if kind == "topk":
        parts.append(f"--patch-size {rule.patch_size!r}")
    else:
        parts.append(f"--threshold {rule.threshold!r}")
    if kind == "combined":
        parts.append(f"--threshold-add {rule.threshold_add!r}")
        if rule.reference_quirks:
            parts.append("--reference-quirks")
    if reset_on_newline:
        parts.append("--reset-on-newline")
    return " ".join(parts)


def reset_on_newline(manifest: Mapping[str, Any]) -> bool:
    """Whether a ``sidecars.json``'s entropies were computed with the newline reset (absent: no)."""
    identity = manifest.get("entropy_model")
    return bool(identity.get("reset_on_newline", False)) if isinstance(identity, Mapping) else False


def choose_tag(path: Any, manifest: Mapping[str, Any], rule: PatchingRule, tag: str | None, data_dir: Any) -> str:
    """The tag of the sidecar that holds `rule` (an explicit `tag` must hold it), else SidecarRuleError
    naming the manifest `path`, the rule and the command that computes it. Also checks the reset."""
    wanted = rule_tag(rule)
    listed = listed_rules(manifest)
    reset = bool(rule.entropy_reset_on_newline)
    command = entropy_command(data_dir, rule, reset, manifest.get("entropy_model_path"))
    if reset_on_newline(manifest) != reset:
        computed = "with" if reset_on_newline(manifest) else "without"
        raise SidecarRuleError(
            f"{path}: the entropies of {data_dir} were computed {computed} the newline reset, but "
            f"config.patching.entropy_reset_on_newline is {reset}; recompute them with: {command} (or fix the config)"
        )
    described = {name: describe(rule_of_record(record, f"{path}: rule {name!r}")) for name, record in listed.items()}
    available = ", ".join(f"{name!r} ({text})" for name, text in described.items()) or "none"
    if tag is not None:
        if tag not in listed:
            raise SidecarRuleError(f"{path}: no sidecar tag {tag!r}; available: {available}")
        if rule_tag(rule_of_record(listed[tag], f"{path}: rule {tag!r}")) != wanted:
            raise SidecarRuleError(
                f"{path}: sidecar tag {tag!r} was computed with {described[tag]}, but config.patching gives "
                f"{describe(rule)}; compute its sidecars with: {command} (or fix the config)"
            )
        return tag
    for name, record in listed.items():
        if rule_tag(rule_of_record(record, f"{path}: rule {name!r}")) == wanted:
            return name
    raise SidecarRuleError(
        f"{path}: no sidecar computed with {describe(rule)} in {data_dir}; available: {available}. "
        f"Compute them with: {command} (or set config.patching to a listed rule)"
    )


# --- the masks -----------------------------------------------------------------------------------


def document_start_mask(
    tokens: np.ndarray, offsets: np.ndarray, entropies: np.ndarray, rule: PatchingRule
) -> np.ndarray:
    """bool [T]: the per-document start mask of `rule` (its stored part) over a shard (module docstring)."""
    rule = stored_rule(rule)
    tokens, entropies = np.asarray(tokens), np.asarray(entropies)
    offsets = np.asarray(offsets, np.int64)
    total = int(tokens.size)
    if entropies.shape != tokens.shape or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != total:
        got = f"{tokens.size} tokens, {entropies.size} entropies, offsets {offsets[:1]}..{offsets[-1:]}"
        raise SidecarRuleError(f"document_start_mask: expected entropies per token and offsets from 0 to T; {got}")
    if total == 0:
        return np.zeros(0, bool)
    if rule.kind == "topk":
        mask = _top_k_mask(tokens, entropies, offsets, rule)
    else:
        mask = patch_start_mask(
            tokens.reshape(1, total), rule, entropies=entropies.reshape(1, total), include_next_token=False
        )[0]
    starts, lengths = offsets[:-1], np.diff(offsets)
    for position in range(rule.forced_starts):
        mask[starts[lengths > position] + position] = True
    if rule.kind == "combined" and rule.reference_quirks:
        mask[starts[lengths > 3] + 3] = False
    return mask


def _top_k_mask(tokens: np.ndarray, entropies: np.ndarray, offsets: np.ndarray, rule: PatchingRule) -> np.ndarray:
    """Top-k per document: the numpy patcher on every document, documents of one length as one
    [B, N] batch (one call per distinct length, so the work stays O(T) without a sort)."""
    starts, lengths = offsets[:-1], np.diff(offsets)
    mask = np.zeros(entropies.size, bool)
    order = np.argsort(lengths, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        n = int(lengths[group[0]]) if group.size else 0
        if n == 0:
            continue
        index = starts[group][:, None] + np.arange(n)
        mask[index] = patch_start_mask(
            tokens[index].astype(np.int32), rule, entropies=entropies[index], include_next_token=False
        )
    return mask
