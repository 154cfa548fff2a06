"""The model channel between the averaging and the distillation servers.

The two servers run as separate processes (possibly separate Flower runs or machines), and Flower
cannot address one ServerApp from another, so they exchange models through a channel of our own:

- versioned: every topic ("distilled", "forward", "global", "stop") holds models with strictly
  increasing integer versions; a reader asks for "something newer than what I have";
- atomic: a reader sees a whole model or none (the directory backend writes a hidden temporary
  file and hard-links it into place, so a half-written file never carries a version name);
- restartable: all state lives in the channel, so a writer that restarts continues after the
  newest version and a reader that restarts starts from it;
- pluggable: :class:`ModelChannel` is the protocol; :data:`CHANNELS` maps a
``distill.channel-backend``
  name to a constructor taking the ``distill.channel-dir`` location. A directory on shared storage
  (local disk, NFS) is the default; an object store or a key-value server would be another
  entry with the same four methods.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

POLL_S = 0.05  # how often a waiting reader looks again; small next to a distillation pass
TOPIC_PATTERN = re.compile(r"^[a-z][a-z0-9-]*$")
VERSION_FILE = re.compile(r"^(\d{10})\.pt$")

State = dict[str, torch.Tensor]


class ChannelTimeout(TimeoutError):
    """A reader waited longer than its timeout for a newer version."""


class ChannelError(ValueError):
    """Misuse of the channel: bad topic, non-increasing version, unreadable entry."""


@dataclass(frozen=True)
class Published:
    """One entry of a topic: the model's state dict plus small JSON-able metadata."""

    version: int
    state: State
    meta: dict[str, Any] = field(default_factory=dict)


class ModelChannel(Protocol):
    """What the servers need from a channel; any backend implementing it can be plugged in."""

    def publish(
        self, topic: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
        version: int | None = None,
    ) -> int:
        """Store a new version (default: newest + 1; an explicit one must be newer)."""
        ...

    def latest_version(self, topic: str) -> int:
        """Newest version of ``topic``, -1 when it is empty; cheap (reads no model)."""
        ...

    def latest(self, topic: str) -> Published | None:
        """Newest entry of ``topic``, or None when it is empty."""
        ...

    def wait(self, topic: str, after: int = -1, timeout: float | None = None) -> Published:
        """Newest entry with version > ``after``; raises ChannelTimeout after ``timeout`` s."""
        ...


class DirectoryChannel:
    """Backend on a directory: ``<root>/<topic>/<version:010d>.pt`` files.

    One writer per topic. Publishing writes ``.<name>.tmp`` in the topic folder, flushes it to
    disk, then ``os.link``s it to the version's name: the link either creates the whole file or
    fails (a version that exists already is an error, so two writers cannot silently overwrite
    each other). Only the newest ``keep`` versions stay; a reader whose file was pruned between
    listing and opening simply looks again.
    """

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ChannelError(f"keep={keep}: must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(
        self, topic: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
        version: int | None = None,
    ) -> int:
        folder = self._folder(topic)
        newest = self.latest_version(topic)
        version = newest + 1 if version is None else int(version)
        if version <= newest:
            raise ChannelError(
                f"topic '{topic}': version {version} is not newer than the stored {newest}"
            )
        buffer = io.BytesIO()
        torch.save({"version": version, "meta": dict(meta or {}),
                    "state": {k: v.detach().cpu() for k, v in state.items()}}, buffer)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(buffer.getbuffer())
                stream.flush()
                os.fsync(stream.fileno())
            try:
                os.link(temporary, folder / f"{version:010d}.pt")
            except FileExistsError:
                raise ChannelError(
                    f"topic '{topic}': version {version} exists already (two writers?)"
                ) from None
        finally:
            os.unlink(temporary)
        self._prune(folder)
        return version

    def latest_version(self, topic: str) -> int:
        versions = self._versions(self._folder(topic))
        return versions[-1] if versions else -1

    def latest(self, topic: str) -> Published | None:
        folder = self._folder(topic)
        while versions := self._versions(folder):
            try:
                entry = torch.load(folder / f"{versions[-1]:010d}.pt", weights_only=True)
            except FileNotFoundError:
                continue  # pruned between listing and opening: list again
            except Exception as error:  # noqa: BLE001 - name the file in the message
                raise ChannelError(
                    f"topic '{topic}': cannot read version {versions[-1]} in {folder}: {error}"
                ) from error
            return Published(int(entry["version"]), entry["state"], entry["meta"])
        return None

    def wait(self, topic: str, after: int = -1, timeout: float | None = None) -> Published:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.latest_version(topic) > after and (entry := self.latest(topic)) is not None:
                return entry
            if deadline is not None and time.monotonic() > deadline:
                raise ChannelTimeout(
                    f"no version of '{topic}' newer than {after} in {self.root} after "
                    f"{timeout:.0f}s; is the other server running on the same channel?"
                )
            time.sleep(POLL_S)

    def _folder(self, topic: str) -> Path:
        if not TOPIC_PATTERN.match(topic):
            raise ChannelError(f"topic '{topic}': use lower-case letters, digits and '-'")
        folder = self.root / topic
        folder.mkdir(exist_ok=True)
        return folder

    @staticmethod
    def _versions(folder: Path) -> list[int]:
        matches = (VERSION_FILE.match(name) for name in os.listdir(folder))
        return sorted(int(match.group(1)) for match in matches if match)

    def _prune(self, folder: Path) -> None:
        for version in self._versions(folder)[: -self.keep]:
            (folder / f"{version:010d}.pt").unlink(missing_ok=True)


# Backends by ``distill.channel-backend`` name: each takes the ``distill.channel-dir`` location.
CHANNELS: dict[str, Callable[[str], ModelChannel]] = {"directory": DirectoryChannel}


def open_channel(backend: str, location: str | Path) -> ModelChannel:
    if backend not in CHANNELS:
        raise ChannelError(
            f"distill.channel-backend='{backend}' is not known; allowed: {', '.join(CHANNELS)}"
        )
    if not str(location):
        raise ChannelError("distill.channel-dir is empty; give the channel's location")
    return CHANNELS[backend](str(location))
