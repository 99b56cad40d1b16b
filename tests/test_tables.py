"""Result tables: mean ± std over seeds, a single network shown without a spread, unseen mean."""

from __future__ import annotations

import pandas as pd

from ld3m.report.tables import UNSEEN, formatted, summary_table


def records(rows: list[tuple[str, str, int, int, float]]) -> pd.DataFrame:
    """(method, arch, ipc, seed, acc) -> records as the harness writes them."""
    return pd.DataFrame([
        {"dataset": "d", "method": m, "arch": a, "ipc": i, "seed": s, "acc": acc, "step": 5,
         "run": m, "distill_arch": "ConvNet"} for m, a, i, s, acc in rows
    ])  # fmt: skip


def test_formatted_table_shows_spread_only_over_several_networks() -> None:
    table = summary_table(records([
        ("dm", "ConvNet", 10, 0, 0.50), ("dm", "ConvNet", 10, 1, 0.60),
        ("dm", "ViT", 10, 0, 0.30), ("dm", "ResNet18", 10, 0, 0.20),
    ]))  # fmt: skip
    assert table[("mean", "ConvNet")].iloc[0] == 55.0
    assert table[("std", "ConvNet")].iloc[0] == 5.0  # population std, as the harness prints
    assert table[("mean", UNSEEN)].iloc[0] == 25.0  # ViT and ResNet18, not ConvNet
    row = formatted(table).iloc[0]
    assert row["ConvNet"] == "55.0 ± 5.0" and row["ViT"] == "30.0" and row[UNSEEN] == "25.0"
    assert list(formatted(table).columns)[3:] == ["ConvNet", "ResNet18", "ViT", UNSEEN]
