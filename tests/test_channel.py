"""The model channel: atomic, versioned, waitable, restartable, across processes."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from fedapps.methods.distill.channel import (
    POLL_S,
    ChannelError,
    ChannelTimeout,
    DirectoryChannel,
    open_channel,
)

SIZE = 200_000  # ~0.8 MB per model: large enough that a non-atomic write would be seen


def model(version: int) -> dict[str, torch.Tensor]:
    """Every tensor filled with the version: a torn or mixed read shows up as mixed values."""
    return {"a": torch.full((SIZE,), float(version)), "b": torch.full((7, 3), float(version))}


def writer(root: str, first: int, last: int) -> None:
    channel = DirectoryChannel(root)
    for version in range(first, last + 1):
        channel.publish("distilled", model(version), {"round": version}, version=version)


def reader(root: str, until: int, queue) -> None:
    """Reads as fast as it can; reports every version seen, or the first inconsistency."""
    channel = DirectoryChannel(root)
    seen, have = [], -1
    while have < until:
        entry = channel.wait("distilled", after=have, timeout=30)
        values = {float(t.min()) for t in entry.state.values()} | {
            float(t.max()) for t in entry.state.values()
        }
        if values != {float(entry.version)} or entry.meta["round"] != entry.version:
            queue.put(f"partial or mixed model at version {entry.version}: {values}")
            return
        seen.append(entry.version)
        have = entry.version
    queue.put(seen)


def test_concurrent_writer_and_reader_see_whole_increasing_models(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    read = context.Process(target=reader, args=(str(tmp_path), 40, queue))
    write = context.Process(target=writer, args=(str(tmp_path), 1, 40))
    read.start()
    write.start()
    write.join(60)
    seen = queue.get(timeout=60)
    read.join(10)
    assert isinstance(seen, list), seen
    assert seen == sorted(set(seen)) and seen[-1] == 40
    assert write.exitcode == 0 and read.exitcode == 0


def test_restart_of_writer_and_reader_carries_on(tmp_path):
    writer(str(tmp_path), 1, 3)
    # writer restarts: a fresh object (new process in practice) continues after version 3
    restarted = DirectoryChannel(tmp_path)
    assert restarted.latest_version("distilled") == 3
    assert restarted.publish("distilled", model(4)) == 4
    with pytest.raises(ChannelError, match="not newer"):
        restarted.publish("distilled", model(2), version=2)
    # reader restarts: it finds the newest model, then waits for the next one
    fresh = DirectoryChannel(tmp_path)
    assert fresh.latest("distilled").version == 4
    with pytest.raises(ChannelTimeout, match="newer than 4"):
        fresh.wait("distilled", after=4, timeout=0.2)
    writer(str(tmp_path), 5, 5)
    assert fresh.wait("distilled", after=4, timeout=1).version == 5


def test_old_versions_are_pruned_and_empty_topics_read_as_none(tmp_path):
    channel = DirectoryChannel(tmp_path, keep=2)
    assert channel.latest("forward") is None and channel.latest_version("forward") == -1
    for version in range(5):
        channel.publish("forward", model(version))
    names = sorted(p.name for p in (tmp_path / "forward").iterdir())
    assert names == ["0000000003.pt", "0000000004.pt"]  # no temporary files left behind


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ChannelError, match="distill.channel-backend='s3' is not known"):
        open_channel("s3", tmp_path)
    with pytest.raises(ChannelError, match="distill.channel-dir is empty"):
        open_channel("directory", "")
    with pytest.raises(ChannelError, match="topic 'Bad/Topic'"):
        DirectoryChannel(tmp_path).publish("Bad/Topic", model(0))
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "0000000001.pt").write_text("not a model")
    with pytest.raises(ChannelError, match="cannot read version 1"):
        DirectoryChannel(tmp_path).latest("global")


def test_wait_returns_as_soon_as_a_model_arrives(tmp_path):
    # a thread publishes: the time from its publish to the wait's return is the poll, not the
    # start-up of a process (the cross-process case is the concurrent writer and reader above)
    published_at: list[float] = []

    def publish_later() -> None:
        time.sleep(0.5)
        DirectoryChannel(tmp_path).publish("distilled", model(0))
        published_at.append(time.monotonic())

    late = threading.Thread(target=publish_later)
    late.start()
    entry = DirectoryChannel(tmp_path).wait("distilled", timeout=60)
    returned_at = time.monotonic()
    late.join()
    assert entry.version == 0 and returned_at - published_at[0] < 5 * POLL_S + 1
