"""Grid and random trials, ranking with failed trials, and the result files."""

import itertools
import json
import math

import pytest

from gptforge.eval.search import grid, grid_size, random_trials, rank_results, read_results, write_results

SPACE = {"lr": [1e-4, 3e-4], "micro_batch_size": [8, 16], "epochs": [2, 3], "lora_rank": [0, 8]}


def test_grid_size_and_order():
    g = grid(SPACE)
    assert len(g) == grid_size(SPACE) == 16
    assert g[0] == {"lr": 1e-4, "micro_batch_size": 8, "epochs": 2, "lora_rank": 0}
    assert g[1] == {"lr": 1e-4, "micro_batch_size": 8, "epochs": 2, "lora_rank": 8}  # last key fastest
    assert g[-1] == {"lr": 3e-4, "micro_batch_size": 16, "epochs": 3, "lora_rank": 8}
    assert all(list(p) == list(SPACE) for p in g)
    ref = [dict(zip(SPACE, combo)) for combo in itertools.product(*SPACE.values())]
    assert g == ref


@pytest.mark.parametrize(
    "space, match",
    [
        ({}, "non-empty dict"),
        ({"lr": [1e-4], "epochs": []}, "'epochs' has an empty list"),
        ({"lr": 1e-4}, "'lr': expected a list"),
        ({"lr": "1e-4"}, "'lr': expected a list"),
        ({"lr": [1e-4, 1e-4]}, "'lr' lists the value 0.0001 twice"),
    ],
)
def test_space_errors(space, match):
    for fn in (grid, lambda s: random_trials(s, 2, 0)):
        with pytest.raises(ValueError, match=match):
            fn(space)


def test_random_trials_distinct_deterministic_and_from_grid():
    g = grid(SPACE)
    a = random_trials(SPACE, 5, seed=1)
    assert len(a) == 5 and len({json.dumps(t) for t in a}) == 5
    assert all(t in g for t in a)
    assert a == random_trials(SPACE, 5, seed=1)
    assert a != random_trials(SPACE, 5, seed=2)
    everything = random_trials(SPACE, 100, seed=1)
    assert len(everything) == 16 and sorted(map(json.dumps, everything)) == sorted(map(json.dumps, g))
    assert everything != g  # shuffled
    with pytest.raises(ValueError, match="n=0"):
        random_trials(SPACE, 0, seed=1)


def test_random_trials_on_a_huge_grid_does_not_materialize_it():
    space = {f"p{i}": list(range(10)) for i in range(12)}  # 10**12 points
    trials = random_trials(space, 20, seed=0)
    assert len({tuple(t.values()) for t in trials}) == 20
    assert all(list(t) == list(space) for t in trials)


def _rows():
    return [
        {"trial": 0, "params": {"lr": 1e-4}, "metrics": {"f1_macro": 0.5, "accuracy": 0.6}},
        {"trial": 1, "params": {"lr": 3e-4}, "metrics": {"f1_macro": float("nan")}, "error": "diverged"},
        {"trial": 2, "params": {"lr": 1e-3}, "metrics": {"f1_macro": 0.7, "accuracy": 0.8}},
        {"trial": 3, "params": {"lr": 3e-3}, "metrics": {"accuracy": 0.9}},
        {"trial": 4, "params": {"lr": 1e-2}},
        {"trial": 5, "params": {"lr": 3e-2}, "metrics": {"f1_macro": 0.5, "accuracy": 0.1}},
        {"trial": 6, "params": {"lr": 0.1}, "metrics": {"f1_macro": float("inf")}},
        {"trial": 7, "params": {"lr": 0.3}, "metrics": {"f1_macro": "0.99"}},
    ]


def test_rank_results_puts_failures_last():
    rows = _rows()
    best_first = [r["trial"] for r in rank_results(rows, "f1_macro", higher_is_better=True)]
    assert best_first == [2, 0, 5, 1, 3, 4, 6, 7]  # tie 0/5 keeps trial order; failures in trial order
    low_first = [r["trial"] for r in rank_results(rows, "f1_macro", higher_is_better=False)]
    assert low_first == [0, 5, 2, 1, 3, 4, 6, 7]
    assert [r["trial"] for r in rank_results(rows, "nope", True)] == list(range(8))
    assert repr(rows) == repr(_rows())  # input untouched (repr: NaN != NaN)


def test_write_results_round_trip(tmp_path):
    rows = _rows()
    shuffled = [rows[i] for i in (5, 2, 7, 0, 4, 1, 6, 3)]
    best = write_results(shuffled, tmp_path / "search", "f1_macro", higher_is_better=True)
    assert best["trial"] == 2
    back = read_results(tmp_path / "search" / "results.jsonl")
    assert [r["trial"] for r in back] == list(range(8))  # trial order
    for got, want in zip(back, rows):
        if got["trial"] in (1, 6):  # non-finite -> null (standard JSON), still ranked as failed
            assert got["metrics"]["f1_macro"] is None and not math.isfinite(want["metrics"]["f1_macro"])
            assert {**got, "metrics": {}} == {**want, "metrics": {}}
        else:
            assert got == want
    assert [r["trial"] for r in rank_results(back, "f1_macro", True)] == [2, 0, 5, 1, 3, 4, 6, 7]
    for line in (tmp_path / "search" / "results.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    md = (tmp_path / "search" / "results.md").read_text().strip().splitlines()
    assert md[0] == "| rank | trial | lr | **f1_macro** (higher is better) | accuracy | error |"
    assert md[2] == "| 1 | 2 | 0.001 | 0.7000 | 0.8000 |  |"
    assert md[3].startswith("| 2 | 0 | 0.0001 | 0.5000 | 0.6000 |")
    assert md[5] == "| - | 1 | 0.0003 | failed |  | diverged |"
    assert len(md) == 2 + 8
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == ["results.jsonl", "results.md"]


def test_write_results_all_failed_still_writes_files(tmp_path):
    rows = [{"trial": 0, "params": {"lr": 1.0}, "metrics": {"loss": float("nan")}}]
    with pytest.raises(ValueError, match=r"none of the 1 trial\(s\) produced a finite 'f1_macro'"):
        write_results(rows, tmp_path, "f1_macro", True)
    assert (tmp_path / "results.jsonl").exists() and "failed" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"trial": 0, "params": {}}, {"trial": 0, "params": {}}], "rows 0 and 1 both have trial=0"),
        ([{"trial": "a", "params": {}}], "'trial' must be an integer"),
        ([{"trial": 0}], "'params' must be a dict"),
        ([{"trial": 0, "params": {"x": object()}, "metrics": {"m": 1.0}}], "trial 0: row is not JSON-serializable"),
    ],
)
def test_write_results_rejects_bad_rows(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        write_results(rows, tmp_path, "m", True)
