"""The journal of tasks in hand: what is kept, and who adopts the rows of a process that died."""

from __future__ import annotations

from pathlib import Path

from backend.nextcloud.journal import Journal


def _task(tid: int) -> dict:
    return {"id": tid, "input": {"input": "a fox", "numberOfImages": 1}}


def test_a_task_is_kept_until_removed(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    assert j.take(_task(7), "p").attempts == 1
    j.finish(7, [b"one", b"two"])
    entry = j.get(7)
    assert entry is not None and entry.state == "deliver"
    assert [Path(p).read_bytes() for p in entry.outcome["pngs"]] == [b"one", b"two"]
    j.uploaded(7, [101])
    assert j.get(7).outcome["file_ids"] == [101]
    j.remove(7)
    assert j.get(7) is None and not (tmp_path / "files" / "7").exists()
    j.close()


def test_rows_of_a_live_process_stay_those_of_a_dead_one_are_adopted(tmp_path: Path) -> None:
    alive, dying = Journal(tmp_path), Journal(tmp_path)
    alive.take(_task(1), "p")
    dying.take(_task(2), "p")
    dying.fail(2, "admin text", "user text")
    dying.take(_task(3), "p")
    # kill: the lock goes with the process; its lock file stays behind
    dying._lock_file.close()
    dying._db.close()
    newcomer = Journal(tmp_path)
    assert newcomer.adopt_orphans() == 2
    assert {e.task_id for e in newcomer.mine()} == {2, 3}
    assert [e.task_id for e in newcomer.mine("deliver")] == [2]
    assert {e.task_id for e in alive.mine()} == {1}
    # a task taken again (run once more after a crash) counts its attempts
    assert newcomer.take(_task(3), "p").attempts == 2
    alive.close()
    newcomer.close()
