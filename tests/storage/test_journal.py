"""The SQLite journal: WAL, statuses, content dedupe, replay order."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from livestack.errors import JournalError
from livestack.storage import journal as journal_mod
from livestack.storage.journal import Journal, read_file_sha256, sha256_file


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    j = Journal(tmp_path / "out" / "journal.sqlite")
    yield j
    j.close()


def test_wal_mode_on_and_visible_to_other_connections(journal: Journal) -> None:
    assert journal.journal_mode() == "wal"
    journal.mark_pending("/a.fits", 10, 1, "aa")
    other = sqlite3.connect(str(journal.path))
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT status FROM frames").fetchall() == [("pending",)]
    finally:
        other.close()


@pytest.mark.parametrize("size", [0, 1, 2880, 100_003])
def test_read_file_sha256_is_the_files_identity(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f.fits"
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path.write_bytes(data)
    got, sha = read_file_sha256(path)
    assert got.tobytes() == data and sha == sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [4095, 4096, 4097, 3 * 4096 + 17])
def test_read_file_hashing_hashes_every_chunk_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    # Chunks of 4 kB: the helper thread gets several, the last one short or empty.
    monkeypatch.setattr(journal_mod, "READ_CHUNK_BYTES", 4096)
    rng = np.random.default_rng(16)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.fits"
    path.write_bytes(data)
    got, pending = journal_mod.read_file_hashing(path)
    assert got.tobytes() == data
    assert pending.hexdigest() == hashlib.sha256(data).hexdigest()


def test_read_file_hashing_holds_no_reference_to_the_bytes_once_hashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A buffer pool hands an array out again only when nothing else holds it: neither the
    # pending hash nor the chunks given to its thread may keep the file's bytes.
    import sys

    monkeypatch.setattr(journal_mod, "READ_CHUNK_BYTES", 4096)
    path = tmp_path / "f.fits"
    path.write_bytes(bytes(range(256)) * 100)
    data, pending = journal_mod.read_file_hashing(path)
    held = sys.getrefcount(data)
    pending.hexdigest()
    assert sys.getrefcount(data) == held - 1  # the pending hash let go of it
    view = np.empty(len(data) + 1, np.uint8)[:len(data)]  # held by its view alone
    assert sys.getrefcount(data.base) == sys.getrefcount(view.base)  # no chunk left
    assert pending.hexdigest() == hashlib.sha256(data.tobytes()).hexdigest()  # kept


def test_read_file_hashing_leaves_no_thread_after_a_failed_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    monkeypatch.setattr(journal_mod, "READ_CHUNK_BYTES", 1024)
    started: list[journal_mod.PendingSha256] = []
    real_init = journal_mod.PendingSha256.__init__

    def recording_init(self: journal_mod.PendingSha256) -> None:
        real_init(self)
        started.append(self)

    monkeypatch.setattr(journal_mod.PendingSha256, "__init__", recording_init)
    path = tmp_path / "growing.fits"
    path.write_bytes(b"x" * 5000 + b"y" * (2 << 20))
    real_fstat = os.fstat

    class Stat:
        st_size = 5000  # small when its size was read; then it grew past the limit

    monkeypatch.setattr(os, "fstat", lambda fd: Stat() if fd > 2 else real_fstat(fd))
    with pytest.raises(OSError) as err:
        journal_mod.read_file_hashing(path, max_bytes=1 << 20)
    assert err.value.errno == errno.EFBIG
    (pending,) = started
    pending._thread.join(timeout=60)  # ends by itself: the read ended its input
    assert not pending._thread.is_alive()


def test_read_file_hashing_falls_back_when_the_helper_thread_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    class FailingDigest:
        def update(self, chunk: memoryview) -> None:
            raise MemoryError("no memory for the hash")

    data = bytes(range(256)) * 64
    path = tmp_path / "f.fits"
    path.write_bytes(data)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # no traceback on stderr
    real_sha256 = hashlib.sha256
    expected = real_sha256(data).hexdigest()
    # The helper's digest (made without data) fails; the fall-back's (with data) works.
    monkeypatch.setattr(journal_mod.hashlib, "sha256",
                        lambda *a: FailingDigest() if not a else real_sha256(*a))
    got, pending = journal_mod.read_file_hashing(path)
    # The caller still gets the identity of exactly the bytes read.
    assert pending.hexdigest() == expected
    assert got.tobytes() == data


def test_read_file_sha256_takes_a_file_that_grew_after_its_size_was_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = tmp_path / "growing.fits"
    data = b"x" * 5000 + b"y" * 3000
    path.write_bytes(data)
    real_fstat = os.fstat

    class Stat:
        st_size = 5000  # the size when the camera had written only the first part

    monkeypatch.setattr(os, "fstat", lambda fd: Stat() if fd > 2 else real_fstat(fd))
    got, sha = read_file_sha256(path)
    assert got.tobytes() == data and sha == hashlib.sha256(data).hexdigest()


def test_read_file_sha256_refuses_a_file_larger_or_growing_past_its_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    path = tmp_path / "growing.fits"
    path.write_bytes(b"x" * 5000 + b"y" * (3 << 20))
    with pytest.raises(OSError) as err:
        read_file_sha256(path, max_bytes=4000)
    assert err.value.errno == errno.EFBIG
    real_fstat = os.fstat

    class Stat:
        st_size = 5000  # small when its size was read; then it kept growing

    monkeypatch.setattr(os, "fstat", lambda fd: Stat() if fd > 2 else real_fstat(fd))
    with pytest.raises(OSError) as err:
        read_file_sha256(path, max_bytes=1 << 20)
    assert err.value.errno == errno.EFBIG and "grew past" in str(err.value)
    got, _ = read_file_sha256(path, max_bytes=4 << 20)  # within the limit: all of it
    assert got.size == 5000 + (3 << 20)


def test_sha256_file_streams_the_content(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10_000
    path = tmp_path / "x.fits"
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()


def test_statuses_and_counts(journal: Journal) -> None:
    ids = [journal.mark_pending(f"/f{i}.fits", 1, 1, f"sha{i}") for i in range(5)]
    assert [r.path for r in journal.pending()] == [f"/f{i}.fits" for i in range(5)]
    journal.finish(ids[0], "accepted", stack_id="s", assign_seq=True, weight=1.5,
                   transform=[1, 0, 2.5, 0, 1, -1.25], model="similarity",
                   metrics={"fwhm_px": 2.0})
    journal.finish(ids[1], "rejected", reason="fwhm_jump", message="too wide", stack_id="s",
                   assign_seq=True)
    journal.finish(ids[2], "failed", reason="truncated", message="short")
    journal.finish(ids[3], "ignored", reason="calibration_frame", message="a dark")
    assert journal.counts("s") == {"pending": 0, "accepted": 1, "rejected": 1, "failed": 0,
                                   "ignored": 0}
    assert journal.counts() == {"pending": 1, "accepted": 1, "rejected": 1, "failed": 1,
                                "ignored": 1}
    row = journal.row(ids[0])
    assert row is not None
    assert (row.status, row.seq, row.weight, row.model) == ("accepted", 1, 1.5, "similarity")
    assert row.transform == [1, 0, 2.5, 0, 1, -1.25]
    assert row.metrics == {"fwhm_px": 2.0}
    failed = journal.row(ids[2])
    assert failed is not None and (failed.reason, failed.message) == ("truncated", "short")
    with pytest.raises(JournalError, match="bad status"):
        journal.finish(ids[4], "pending")


def test_already_done_by_content_hash(journal: Journal) -> None:
    rid = journal.mark_pending("/night/a.fits", 10, 100, "abc")
    assert journal.already_done("/night/a.fits", "abc") is None  # pending is not done
    journal.finish(rid, "accepted", stack_id="s", assign_seq=True)
    # Touched (same path, same content) and renamed (other path, same content): done.
    assert journal.already_done("/night/a.fits", "abc") is not None
    dup = journal.already_done("/night/renamed.fits", "abc")
    assert dup is not None and dup.path == "/night/a.fits"
    # New content under the old name is new work.
    assert journal.already_done("/night/a.fits", "def") is None
    # seen() is the cheap pre-check by (path, size, mtime).
    assert journal.seen("/night/a.fits", 10, 100)
    assert not journal.seen("/night/a.fits", 10, 101)


def test_failed_or_empty_content_elsewhere_is_processed_again(journal: Journal) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    rid = journal.mark_pending("/a.fits", 0, 1, empty)
    journal.finish(rid, "failed", reason="empty_file")
    assert journal.already_done("/a.fits", empty) is not None
    assert journal.already_done("/b.fits", empty) is None
    rid = journal.mark_pending("/c.fits", 5, 1, "bad")
    journal.finish(rid, "failed", reason="truncated")
    assert journal.already_done("/d.fits", "bad") is None


def test_mark_pending_reuses_the_row_of_the_same_file(journal: Journal) -> None:
    first = journal.mark_pending("/a.fits", 10, 1, "abc")
    assert journal.mark_pending("/a.fits", 10, 1, "abc") == first
    assert journal.mark_pending("/a.fits", 12, 2, "xyz") != first
    no_hash = journal.mark_pending("/gone.fits", None, None, None)
    assert journal.mark_pending("/gone.fits", None, None, None) == no_hash


def test_rows_after_orders_by_seq_and_skips_inactive(journal: Journal) -> None:
    ids = []
    for i, status in enumerate(["accepted", "rejected", "failed", "accepted", "accepted"]):
        rid = journal.mark_pending(f"/f{i}.fits", 1, 1, f"h{i}")
        journal.finish(rid, status, stack_id="s", assign_seq=True)
        ids.append(rid)
    other = journal.mark_pending("/o.fits", 1, 1, "o")
    journal.finish(other, "accepted", stack_id="t", assign_seq=True)
    assert [r.seq for r in journal.rows_after("s", 0)] == [1, 2, 4, 5]
    assert [r.path for r in journal.rows_after("s", 2)] == ["/f3.fits", "/f4.fits"]
    assert journal.last_seq("s") == 5 and journal.last_seq("t") == 1
    journal.ensure_stack("s", {"object": "M42"}, "n/s")
    journal.deactivate("s", [ids[3]])
    assert [r.seq for r in journal.rows_after("s", 0)] == [1, 2, 5]
    assert journal.counts("s")["accepted"] == 2
    stack = journal.stack("s")
    assert stack is not None and stack.generation == 1 and stack.key == {"object": "M42"}


def test_rewrite_stack_renumbers_and_bumps_generation(journal: Journal) -> None:
    ids = []
    for i in range(3):
        rid = journal.mark_pending(f"/f{i}.fits", 1, 1, f"h{i}")
        journal.finish(rid, "accepted", stack_id="s", assign_seq=True, transform=[1] * 6)
        ids.append(rid)
    journal.ensure_stack("s", {}, "s")
    journal.rewrite_stack("s", [(ids[2], 1, [1, 0, 0, 0, 1, 0]), (ids[0], 2, None)])
    rows = journal.rows_after("s", 0)
    assert [r.id for r in rows] == [ids[2], ids[0], ids[1]]
    assert rows[0].transform == [1, 0, 0, 0, 1, 0] and rows[1].transform == [1] * 6
    assert journal.stack("s").generation == 1  # type: ignore[union-attr]


def test_state_checkpoint_bookkeeping_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    rid = j.mark_pending("/a.fits", 1, 1, "a")
    j.finish(rid, "accepted", stack_id="s", assign_seq=True, state={"router": {"n": 1}})
    j.note_checkpoint("s", 1, 1, 0, "/x/checkpoint.npz")
    j.close()
    j = Journal(path)
    assert j.get_state("router") == {"n": 1}
    assert j.get_state("missing", 7) == 7
    ck = j.checkpoint("s")
    assert ck is not None and (ck.seq, ck.n_files, ck.path) == (1, 1, "/x/checkpoint.npz")
    j.close()


def test_not_a_database_is_a_journal_error(tmp_path: Path) -> None:
    bad = tmp_path / "journal.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match=r"journal\.sqlite"):
        Journal(bad)
