"""Model sources by name: a local folder, a URI, or a Hugging Face Hub id such as ``facebook/blt-1b``.

    path = resolve_model_source("facebook/blt-1b")   # .../hub/models--facebook--blt-1b/snapshots/<commit>

Every reader of a model (`bltjax.inference.restore.load_for_inference`, the entropy model of
`bltjax.data.entropy`, hence eval, generate, the entropy pass and the sweep) calls this first.
The rules, in order:

1. A URI (``gs://...``) or a path that exists is used as it is: a local folder named like a
   Hub id wins over the Hub.
2. Otherwise a name of the form ``owner/name`` (optionally ``@revision``) is a Hub id, looked
   up in huggingface_hub's own cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, as huggingface_hub
   reads them), the layout ``models--owner--name/{refs,snapshots,blobs}`` that `hf download`
   and `transformers` fill. The snapshot folder of the revision (default ``main``) is returned.
3. Not cached: a `ModelSourceError` naming the cache and the command that fills it
   (``hf download owner/name``). Nothing is ever downloaded here: a mistyped relative path of
   two parts would otherwise cost a network round trip (or a timeout on an offline cluster),
   and a multi-gigabyte download should be a visible step (so HF_HUB_OFFLINE=1 changes nothing here).

The environment is read at each call, not at import, so a program and its tests can point
the cache elsewhere after start-up.
"""

from __future__ import annotations

import os
import pathlib
import re

from etils import epath

from bltjax.runtime import paths

# owner/name with huggingface_hub's allowed characters, and an optional @revision (branch, tag, commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?$")


class ModelSourceError(FileNotFoundError):
    """A model name that is neither a folder nor a Hub id that can be had; the message says what was tried."""


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """(repo id, revision) of ``owner/name[@revision]``, else None (a path with more parts, './x', '~/x', ...)."""
    match = _HUB_ID.match(text)
    if not match or ".." in match.group("repo") or match.group("repo").endswith((".git", ".")):
        return None
    return match.group("repo"), match.group("revision") or "main"


def hub_cache_dir() -> pathlib.Path:
    """huggingface_hub's model cache, from the environment as it is now (its constants are read at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return pathlib.Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return pathlib.Path(constants.HF_HUB_CACHE)


def resolve_model_source(source: paths.PathLike) -> epath.Path:
    """The folder ``source`` names: itself when it exists (or is a URI), else the Hub snapshot of that id."""
    text = os.fspath(source)
    if paths.is_uri(text):
        return paths.resolve(text)
    local = paths.resolve(text)
    hub_id = parse_hub_id(text)
    if local.exists() or hub_id is None:
        return local
    return hub_snapshot(*hub_id, given=text)


def cached_repo_folder_name(path: paths.PathLike) -> str | None:
    """``models--owner--name`` when ``path`` lies in a Hub cache snapshot, else None.

    Outputs that default to "next to the model" must not land inside the cache, which
    huggingface_hub owns and may delete or share between users.
    """
    parts = paths.resolve(path).parts
    for part, after in zip(parts, parts[1:], strict=False):
        if part.startswith("models--") and after == "snapshots":
            return part
    return None


def hub_snapshot(repo_id: str, revision: str = "main", *, given: str | None = None) -> epath.Path:
    """The cached snapshot folder of ``repo_id`` at ``revision``; ModelSourceError when it is not cached."""
    given = given or repo_id
    local = paths.resolve(given)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    except ImportError:
        raise ModelSourceError(
            f"{local}: no such folder; as a Hugging Face Hub id ({repo_id}) it needs huggingface_hub, "
            "which the hf extra installs (pip install 'bltjax[hf]')"
        ) from None
    cache = hub_cache_dir()
    try:
        return epath.Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except IncompleteSnapshotError as err:  # a LocalEntryNotFoundError too: caught first
        raise ModelSourceError(
            f"{local}: no such folder, and the cached snapshot of {repo_id} in {cache} is incomplete ({err})"
        ) from None
    except LocalEntryNotFoundError:
        fetch = f"hf download {repo_id}" + ("" if revision == "main" else f" --revision {revision}")
        raise ModelSourceError(
            f"{local}: no such folder, and no snapshot of the Hugging Face model {repo_id} (revision {revision}) "
            f"in the cache {cache}; fetch it into that cache with `{fetch}`, or give a local folder"
        ) from None
    except HFValidationError as err:
        raise ModelSourceError(f"{local}: no such folder, and {given!r} is not a valid Hub id ({err})") from None
