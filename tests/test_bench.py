"""bench.py's failure handling: a case or a part that raises is one row of the table, and the rest still runs."""
import torch

import bench


def test_a_failing_case_is_one_row_and_the_cases_after_it_still_run(monkeypatch):
    calls = []

    def kernel_row(case, dtype_name, *args):
        calls.append(case["name"])
        if len(calls) == 1:
            raise RuntimeError("what went wrong\nand a traceback's worth of detail")
        return bench.Row("kernel", case["name"], dtype_name, "1.0 ms")

    monkeypatch.setattr(bench, "kernel_row", kernel_row)
    rows = list(bench.bench_kernel(torch.device("cpu"), ["fp32"], quick=True))
    assert len(rows) == len(bench.KERNEL_CASES) == len(calls)
    assert (rows[0].plain, rows[0].details) == ("error", "RuntimeError: what went wrong")
    assert all(r.plain == "1.0 ms" for r in rows[1:])


def test_a_part_that_fails_is_recorded_and_the_table_still_printed(tmp_path, capsys):
    rows = bench.main(["propagate"], device="cpu", quick=True, davis=str(tmp_path),
                      checkpoint=str(tmp_path / "missing.pt"))
    assert [r.plain for r in rows] == ["error"] and "checkpoint not found" in rows[0].details
    assert "| propagate | the whole part | - | error | error |" in capsys.readouterr().out


def test_an_interrupted_part_keeps_the_rows_it_measured(monkeypatch, capsys):
    def bench_kernel(device, dtypes, quick):
        yield bench.Row("kernel", "first case", "fp32", "1.0 ms")
        raise KeyboardInterrupt  # a time limit's SIGINT in the middle of the second case

    monkeypatch.setattr(bench, "bench_kernel", bench_kernel)
    rows = bench.main(["kernel", "train"], device="cpu", quick=True)
    assert [r.case for r in rows] == ["first case", "interrupted (SIGINT): the cases after the last row were not run"]
    assert "| kernel | first case | fp32 | 1.0 ms |" in capsys.readouterr().out  # train never started


def test_useful_flop_counts_the_window_pairs_clipped_to_the_map():
    # a 3x3 map, radius 1: 2 + 3 + 2 positions in reach along each axis, 7 x 7 (query, candidate) pairs
    case = dict(H=3, W=3, radius=1, R=2, C=5, K=3, backward=False)
    assert bench.useful_flop(case, B=1) == 2 * 2 * 49 * (5 + 3)
    assert bench.useful_flop(dict(case, backward=True), B=2) == 3 * 2 * bench.useful_flop(case, B=1)


def test_useful_flop_with_radii_and_topk_counts_k_label_products():
    # radii 1 and 0 on a 3x3 map: 49 + 9 pairs of scores; top-2: 2 label products per query, not one per pair
    case = dict(H=3, W=3, radius=(1, 0), R=2, C=5, K=3, backward=False)
    assert bench.useful_flop(case, B=1) == 2 * ((49 + 9) * 5 + (49 + 9) * 3)
    assert bench.useful_flop(dict(case, topk=2), B=1) == 2 * ((49 + 9) * 5 + 9 * 2 * 3)
