"""Eight annotators at once through the page's API while the trainer trains (``bench load``, bounded): no revision a
client was told about is lost, every refused save or undo says why, and racing saves on one image are refused."""

from __future__ import annotations

from pathlib import Path

from labelsmart.bench import load


def test_eight_clients_lose_nothing_and_every_refusal_is_explained(tiny_dataset: Path, tmp_path: Path):
    result = load.run_load(tiny_dataset, tmp_path / "run", clients=8, ops=25)
    assert result["wrong"] == [] and result["lost"] == []
    assert result["saves"] >= 8  # every client saved
    assert result["refused"] >= 4  # two clients per image: the later of their first saves is refused
    assert sum(p["n"] for p in result["latency"].values()) >= 8 * 25
    assert {"save", "undo", "images", "open"} <= set(result["latency"])
    table = load.format_table(result)
    assert table.count("\n") == len(result["latency"]) + 1
