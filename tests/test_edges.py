"""A chosen α or β on the edge of its list: grid_edges, the warning of choose_point, the mark
(†) and footnote in the tables, and the LiNeS protocol named in the tables' notes."""

import logging

from submerge.recipe import EDGE_MARK, GridPoint, choose_point, grid_edges

GRID = [GridPoint(a, b) for a in (0.1, 0.2, 0.4) for b in (0.0, 0.2, 0.4)]


def test_grid_edges():
    assert grid_edges(GridPoint(0.2, 0.2), GRID) == ()
    assert grid_edges(GridPoint(0.4, 0.2), GRID) == ("alpha",)
    assert grid_edges(GridPoint(0.1, 0.2), GRID) == ("alpha",)  # smallest α > 0: widen down
    assert grid_edges(GridPoint(0.2, 0.0), GRID) == ()  # β = 0 ends β's domain
    assert grid_edges(GridPoint(0.4, 0.4), GRID) == ("alpha", "beta")
    # a single value is no search: no edge; no β (unboosted) has none
    assert grid_edges(GridPoint(0.4, 0.0), [GridPoint(0.4, 0.0)]) == ()
    assert grid_edges(GridPoint(0.2, None), [GridPoint(a, None) for a in (0.1, 0.2)]) == ("alpha",)


def test_choose_point_warns_on_the_edge(caplog):
    expert = {"t": 1.0}
    acc = {p: {"t": 0.5 + (0.1 if p == GridPoint(0.4, 0.2) else 0.0)} for p in GRID}
    with caplog.at_level(logging.WARNING, logger="submerge.recipe"):
        point, _ = choose_point(acc.items(), expert, where="g/m")
    assert point == GridPoint(0.4, 0.2)
    assert "g/m: chosen point a0.4_b0.2 is on the edge of its grid (alpha)" in caplog.text
    caplog.clear()
    acc = {p: {"t": 0.5 + (0.1 if p == GridPoint(0.2, 0.2) else 0.0)} for p in GRID}
    with caplog.at_level(logging.WARNING, logger="submerge.recipe"):
        choose_point(acc.items(), expert)
    assert "edge" not in caplog.text
    # a choice over part of a grid (the best α of one β) does not warn when told so
    acc = {p: {"t": 0.5 + (0.1 if p == GridPoint(0.4, 0.2) else 0.0)} for p in GRID}
    with caplog.at_level(logging.WARNING, logger="submerge.recipe"):
        point, _ = choose_point(acc.items(), expert, warn_edges=False)
    assert point == GridPoint(0.4, 0.2) and "edge" not in caplog.text


def test_tables_mark_edge_points_and_name_the_lines_protocol():
    from test_report_tables import RECIPE, make_scores

    from submerge.report import tables as T

    scores = make_scores()
    table = T.main_results(scores, RECIPE)
    edges = T.edge_points(scores, RECIPE.methods)
    # the α list is (0.5, 1.0) in these tests: every chosen α is on an edge
    assert edges and all("alpha" in ax for ax in edges.values())
    md, csv = T.to_markdown(table), T.to_csv_text(table)
    assert EDGE_MARK in md and EDGE_MARK not in csv
    assert "on the edge of its list" in md
    assert "LiNeS fixed-slope protocol" in md  # the test config's LiNeS methods
    cell = table.loc["TA", ("big", "Acc")]
    assert isinstance(cell, T.Marked) and T.format_cell(cell, 1).endswith(EDGE_MARK)
