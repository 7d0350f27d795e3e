"""Saved corrections: one complete line per save, even when many saves race; training reads them."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

from training.data import load_pairs
from training.flywheel import PAIRS_FILE, save_correction, save_preference


def _save_many(folder, worker: int, count: int) -> None:
    for i in range(count):
        # Long, multi-byte lines make torn writes likely if appends were not atomic.
        save_correction(folder, f"worker {worker} comment {i} " + "ü" * 3000, f"reply {i} –Maya")


def test_concurrent_saves_from_threads_and_processes_never_tear_a_line(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda w: _save_many(tmp_path, w, 25), range(8)))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(tmp_path, 100 + w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = (tmp_path / PAIRS_FILE).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    rows = [json.loads(line) for line in lines[:-1]]
    assert len(rows) == 11 * 25
    assert len({r["comment"] for r in rows}) == 11 * 25


def test_saved_file_is_training_data_as_is(tmp_path):
    save_correction(tmp_path, 'He said "hi"\nand left', "Bye! –Maya")
    path = save_preference(tmp_path, "c", "chosen", "rejected")
    pairs = load_pairs(tmp_path / PAIRS_FILE)
    assert [(p.comment, p.response) for p in pairs] == [('He said "hi"\nand left', "Bye! –Maya")]
    assert json.loads(path.read_text()) == {"comment": "c", "chosen": "chosen", "rejected": "rejected"}
