"""Where adapters come from. A source turns an adapter id or URI into a local
directory in PEFT layout; it may block (disk, network), so callers run it in a
thread. Operators add schemes (s3://, https://, a registry) with `register`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

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


class HubSource:
    """hf://org/repo[@revision]. Works offline from the huggingface_hub cache; a
    hub that cannot be reached fails fast instead of hanging."""

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s

    def fetch(self, uri: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        spec = uri.removeprefix("hf://")
        repo, _, revision = spec.partition("@")
        if repo.count("/") != 1:
            raise AdapterNotFound(f"{uri}: expected hf://org/repo[@revision]")
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(self.timeout_s))
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(self.timeout_s))
        try:
            path = snapshot_download(
                repo,
                revision=revision or None,
                allow_patterns=["adapter_config.json", "adapter_model.safetensors"],
            )
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise AdapterNotFound(f"{uri}: not on the hub ({type(exc).__name__})") from exc
        except LocalEntryNotFoundError as exc:
            raise SourceUnavailable(
                f"{uri}: hub unreachable and not in the local cache; retry later or load "
                "the adapter from a local path"
            ) from exc
        except OSError as exc:
            raise SourceUnavailable(f"{uri}: hub unreachable ({exc})") from exc
        return LocalSource().fetch(path)


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
