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


def test_a_run_shows_its_config_protocol_never_a_mix() -> None:
    rows = records([("dm", "ConvNet", 10, 0, 0.50), ("dm", "ConvNet", 10, 0, 0.70),
                    ("dm", "ViT", 10, 0, 0.30), ("dc", "ConvNet", 10, 0, 0.40),
                    ("dc", "ConvNet", 10, 0, 0.20), ("mtt", "ConvNet", 10, 0, 0.60)])  # fmt: skip
    rows["protocol"] = ["old", "new", "old", "a", "b", "old"]
    rows["current"] = [False, True, False, False, False, False]
    rows["labels"] = ["hard", "hard", "hard", "teacher", "teacher", None]
    rows["config_labels"] = "hard"
    table = summary_table(rows)
    # dm: the config's protocol only (its ViT network is of the old protocol: not shown);
    # mtt: nothing of the config's protocol yet, so no row; dc (soft labels on a hard-label
    # run, an ad-hoc evaluation): the protocol written last.
    assert table.loc[("d", "dm", 10), ("mean", "ConvNet")] == 70.0
    assert ("mean", "ViT") not in table.columns
    assert table.loc[("d", "dc", 10), ("mean", "ConvNet")] == 20.0
    assert ("d", "mtt", 10) not in table.index


def test_no_record_of_the_current_protocol_is_an_empty_table() -> None:
    rows = records([("dm", "ConvNet", 10, 0, 0.50)])
    rows["protocol"], rows["current"], rows["config_labels"] = "old", False, "hard"
    assert summary_table(rows).empty


def test_unseen_mean_only_where_a_row_has_every_unseen_architecture_of_its_dataset() -> None:
    # a sweep cut short: dm has ViT and ResNet18, dc only ViT, mtt only ConvNet
    table = summary_table(records([
        ("dm", "ConvNet", 10, 0, 0.50), ("dm", "ViT", 10, 0, 0.30), ("dm", "ResNet18", 10, 0, 0.20),
        ("dc", "ConvNet", 10, 0, 0.40), ("dc", "ViT", 10, 0, 0.10),
        ("mtt", "ConvNet", 10, 0, 0.60),
    ]))  # fmt: skip
    unseen = table[("mean", UNSEEN)]
    assert unseen.loc[("d", "dm", 10)] == 25.0
    assert pd.isna(unseen.loc[("d", "dc", 10)])  # not ViT alone against dm's ViT + ResNet18
    assert pd.isna(unseen.loc[("d", "mtt", 10)])
