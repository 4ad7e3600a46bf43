"""Where adapters come from. A source turns an adapter id or URI into a local
directory in PEFT layout; it may block (disk, network), so callers run it in a
thread. Operators add schemes (s3://, https://, a registry) with `register`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

from lorapool import progress
from lorapool.errors import AdapterNotFound, SourceUnavailable


class AdapterSource(Protocol):
    def fetch(self, uri: str) -> Path:
        """Return a local PEFT directory for uri; raise AdapterNotFound or
        SourceUnavailable."""
        ...


class LocalSource:
    """Plain paths and file:// URIs."""

    def fetch(self, uri: str) -> Path:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(f"no PEFT adapter at {path} (adapter_config.json missing)")
        return path


def hub_snapshot(
    repo: str,
    revision: str | None,
    allow_patterns: list[str] | None = None,
    timeout_s: float = 10.0,
) -> Path:
    """A local snapshot of a Hugging Face Hub repo, downloaded with short timeouts
    or, when the hub cannot be reached (or HF_HUB_OFFLINE is set), taken from the
    huggingface_hub cache, so an unreachable hub fails fast. Raises LookupError when
    the hub says the repo or revision does not exist, ConnectionError when it cannot
    be reached and the cache does not hold the snapshot.

    huggingface_hub draws its own download bars when someone watches (stderr a
    terminal, or LORAPOOL_PROGRESS=1; lorapool.progress), and none in logs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision or None,
                allow_patterns=allow_patterns,
                etag_timeout=timeout_s,  # the metadata call that decides "unreachable"
                tqdm_class=None if progress.wanted() else _quiet_tqdm(),  # None: the hub's bars
            )
        )
    except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError)
        raise ConnectionError("the hub is unreachable and the local cache lacks it") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise LookupError(f"not on the hub ({type(exc).__name__})") from exc
    except OSError as exc:
        raise ConnectionError(f"the hub is unreachable ({exc})") from exc


@functools.cache
def _quiet_tqdm() -> type:
    """huggingface_hub's tqdm class, drawing nothing (every bar of a snapshot
    download goes through the class given to snapshot_download)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class QuietTqdm(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) for "org/name[@revision]", else None."""
    repo, _, revision = spec.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        return None
    return repo, revision or None


class HubSource:
    """hf://org/repo[@revision]. Works offline from the huggingface_hub cache; a
    hub that cannot be reached fails fast instead of hanging."""

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s

    def fetch(self, uri: str) -> Path:
        parsed = parse_hub_id(uri.removeprefix("hf://"))
        if parsed is None:
            raise AdapterNotFound(f"{uri}: expected hf://org/repo[@revision]")
        try:
            path = hub_snapshot(
                *parsed,
                allow_patterns=["adapter_config.json", "adapter_model.safetensors"],
                timeout_s=self.timeout_s,
            )
        except LookupError as exc:
            raise AdapterNotFound(f"{uri}: {exc}") from exc
        except ConnectionError as exc:
            raise SourceUnavailable(
                f"{uri}: {exc}; retry later or load the adapter from a local path"
            ) from exc
        return LocalSource().fetch(str(path))


class SourceRegistry:
    """Maps adapter ids to URIs and URI schemes to sources.

    Resolution of a bare id: an explicit URI registered for it (LoadAdapter), else
    `<root>/<id>` for each adapter root directory, else unknown."""

    def __init__(self, roots: list[str | Path] | None = None):
        self.roots = [Path(r) for r in roots or []]
        self.schemes: dict[str, AdapterSource] = {"file": LocalSource(), "hf": HubSource()}
        self.known: dict[str, str] = {}  # adapter id -> uri

    def register(self, scheme: str, source: AdapterSource) -> None:
        self.schemes[scheme] = source

    def remember(self, adapter_id: str, uri: str) -> None:
        self.known[adapter_id] = uri

    def uri_for(self, adapter_id: str) -> str | None:
        if adapter_id in self.known:
            return self.known[adapter_id]
        if Path(adapter_id).name != adapter_id or adapter_id.startswith("."):
            return None  # a root holds plain folder names; never walk out of it
        for root in self.roots:
            try:
                if (root / adapter_id / "adapter_config.json").is_file():
                    return str(root / adapter_id)
            except OSError:  # a name the file system cannot hold (too long, bad bytes)
                return None
        return None

    def listable(self) -> dict[str, str]:
        """Every adapter a source knows without a network call."""
        found: dict[str, str] = {}
        for root in self.roots:
            if root.is_dir():
                for d in sorted(root.iterdir()):
                    if (d / "adapter_config.json").is_file():
                        found.setdefault(d.name, str(d))
        found.update(self.known)
        return found

    def fetch(self, uri: str) -> Path:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        source = self.schemes.get(scheme)
        if source is None:
            raise AdapterNotFound(
                f"no source registered for scheme {scheme}:// (known: {sorted(self.schemes)})"
            )
        return source.fetch(uri)
