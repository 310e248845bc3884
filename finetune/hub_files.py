"""Files of a hub repo at one commit, from huggingface_hub's cache, with the hub's refusals as one line.

A model, tokenizer or dataset named by hub id is fetched with `snapshot_download` and then read from
its snapshot folder, whose name is the commit: what a run read is pinned (a branch or tag is resolved
once) and recorded, and transformers and datasets read a local folder, never the network. HF_ENDPOINT,
HF_HUB_OFFLINE and HF_TOKEN are read when a download starts; the token goes to huggingface_hub only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError

LOGIN = "log in with `hf auth login` or set HF_TOKEN"
NOT_CACHED = "not in the local cache; run once online or give a local folder"
HF_DEFAULT = "https://huggingface.co"


@dataclass(frozen=True)
class Snapshot:
    """A hub repo's files at one commit, in the local cache."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None  # as the recipe asked: a branch, tag, commit or None (the default branch)
    commit: str
    folder: Path

    def record(self) -> dict:
        """What a run folder keeps of it (the folder is this machine's cache, so it is left out)."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(
    repo_id: str,
    *,
    key: str,
    repo_type: str = "model",
    revision: str | None = None,
    patterns: list[str] | None = None,
    ignore: list[str] | None = None,
) -> Snapshot:
    """The files of `repo_id` at `revision` matching `patterns`, downloaded if not cached.

    Args:
        repo_id: `namespace/name`.
        key: the recipe key that names the repo, for the error messages.
        repo_type: "model" or "dataset".
        revision: branch, tag or commit; None is the default branch.
        patterns: glob patterns of the files to fetch (None: all but `ignore`).
        ignore: glob patterns of files never fetched.

    Raises:
        InputError: unknown repo, gated or private repo without a token, unknown revision, or not cached
            while offline or while the hub cannot be reached; one line naming `key`.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    where = f"{key}: {repo_id}{describe_revision(revision)}"
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=ignore,
            endpoint=endpoint,
            local_files_only=offline(),
        )
    except LocalEntryNotFoundError:
        cause = "offline (HF_HUB_OFFLINE=1)" if offline() else f"cannot reach the hub at {endpoint or HF_DEFAULT}"
        raise InputError(f"{where}: {cause}, and {NOT_CACHED}") from None
    except HFValidationError as e:
        raise InputError(f"{key}: {repo_id!r} is neither a local path nor a hub id ({_first_line(e)})") from None
    except HfHubHTTPError as e:
        raise InputError(f"{where}: {refusal(e, repo_id, repo_type, revision)}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # no file matched: an empty folder, which the loaders report
    return Snapshot(repo_id, repo_type, revision, folder.name, folder)


def describe_revision(revision: str | None) -> str:
    """
    >>> describe_revision(None), describe_revision("v2"), describe_revision("0123456789" * 4)
    ('', ' (revision v2)', ' at commit 0123456789012345678901234567890123456789')
    """
    if revision is None:
        return ""
    return f" at commit {revision}" if re.fullmatch(r"[0-9a-f]{40}", revision) else f" (revision {revision})"


def refusal(error: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    """What the hub's error means for the user, and what to do about it."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    kind = "dataset" if repo_type == "dataset" else "model"
    if isinstance(error, GatedRepoError):
        return f"a gated {kind}: accept its conditions on the hub's page for {repo_id}, then {LOGIN}"
    if isinstance(error, RepositoryNotFoundError):
        # the hub answers alike for a repo that does not exist and one the caller may not see
        if get_token() is None:
            return f"no such {kind} repo, or it is private or gated and no token is set: {LOGIN}"
        return f"no such {kind} repo, or the token set has no access to it"
    if isinstance(error, RevisionNotFoundError):
        return f"no revision {revision!r} (a branch, tag or commit) in the {kind} repo"
    status = getattr(getattr(error, "response", None), "status_code", "?")
    return f"the hub answered HTTP {status}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
