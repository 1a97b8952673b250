"""The journal keeps every acknowledged sample: batches are atomic, and `kill -9` loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import urllib.request
from pathlib import Path

import pytest

from mace.train.journal import Journal, NewSample
from tests.test_cli import free_port, mace, wait_ready


def test_batch_is_all_or_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", 5)
    journal.append([NewSample("p", "c")])
    with pytest.raises(sqlite3.Error):
        journal.append([NewSample("p", "c"), NewSample("p", None)])  # type: ignore[arg-type]
    assert journal.counts().total == 1
    journal.mark_trained([1], cursor=1, losses=[0.7])
    assert journal.counts().trained == 1 and journal.cursor() == 1
    journal.close()


def held_out(journal: Journal) -> list[tuple[str, str, str]]:
    return [(row.tenant, row.prompt, row.completion) for row in journal.since(0) if row.held_out]


def test_a_correction_sent_once_is_never_held_out(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", 5)
    journal.append([NewSample(f"question {index}?", f"answer {index}") for index in range(12)])
    assert held_out(journal) == []
    assert journal.counts().held_out == 0
    journal.close()


def test_only_repeats_of_a_taught_answer_are_held_out_at_most_one_in_n(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", 5)
    phrasings = [f"What is my cat called, version {index}?" for index in range(4)]
    for _ in range(4):
        journal.append([NewSample(prompt, "Zorblax") for prompt in phrasings])
    rows = journal.since(0)
    assert [row.sample_id for row in rows if row.held_out] == [5, 10, 15]
    trained_prompts = {row.prompt for row in rows if not row.held_out}
    assert trained_prompts == set(phrasings)  # every phrasing is trained, whichever was held out
    journal.close()


def test_a_changed_answer_is_trained_and_so_is_a_return_to_an_older_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", 2)
    journal.append([NewSample("colour?", "blue"), NewSample("colour?", "blue")])  # the repeat is held out
    journal.append([NewSample("colour?", "red"), NewSample("colour?", "blue")])  # neither repeats the newest
    assert [(row.completion, row.held_out) for row in journal.since(0)] == [
        ("blue", False), ("blue", True), ("red", False), ("blue", False)]
    journal.close()


def test_the_choice_is_per_tenant_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path, 3)
    journal.append([NewSample("cat?", "Zorblax", tenant="alice"), NewSample("cat?", "Zorblax", tenant="bob")])
    journal.close()
    journal = Journal(path, 3)  # alice and bob have one credit each, carried over
    journal.append([NewSample("cat?", "Zorblax", tenant="alice"), NewSample("cat?", "Zorblax", tenant="alice")])
    assert held_out(journal) == [("alice", "cat?", "Zorblax")]  # alice's third sample, a repeat of her own
    journal.append([NewSample("cat?", "Zorblax", tenant="bob"), NewSample("cat?", "Zorblax", tenant="bob")])
    assert held_out(journal) == [("alice", "cat?", "Zorblax"), ("bob", "cat?", "Zorblax")]
    journal.close()


def post(port: int, path: str, body: object | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


@pytest.mark.parametrize("kill_after_acks", [3, 17])
def test_kill_9_keeps_every_acknowledged_sample(tmp_path: Path, kill_after_acks: int) -> None:
    env = {**os.environ, "MACE_CACHE_DIR": str(tmp_path / "cache"), "MACE_DATA_DIR": str(tmp_path / "data")}
    port = free_port()
    process = mace("serve", "--config", "configs/tiny.toml", "--port", str(port), env=env, log=tmp_path / "a.log")
    acknowledged: list[int] = []
    stop = threading.Event()

    def sender() -> None:
        sample = {"prompt": "colour?", "completion": "blue"}
        while not stop.is_set():
            try:
                acknowledged.extend(post(port, "/v1/feedback", [sample, sample])["ids"])  # type: ignore[arg-type]
            except OSError:
                return

    try:
        wait_ready(port, process)
        thread = threading.Thread(target=sender)
        thread.start()
        while len(acknowledged) < 2 * kill_after_acks and thread.is_alive():
            thread.join(0.01)
        process.send_signal(signal.SIGKILL)  # mid-stream of acknowledgements
        process.wait(timeout=30)
        stop.set()
        thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    restarted = mace("serve", "--config", "configs/tiny.toml", "--port", str(port), env=env, log=tmp_path / "b.log")
    try:
        wait_ready(port, restarted)
        counts = post(port, "/v1/feedback")
        assert isinstance(counts["total"], int) and counts["total"] >= len(acknowledged) > 0
        journal = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
        stored = {row[0] for row in journal.execute("SELECT id FROM samples")}
        journal.close()
        assert set(acknowledged) <= stored
    finally:
        restarted.send_signal(signal.SIGINT)
        restarted.wait(timeout=30)
