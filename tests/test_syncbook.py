"""The notebook's record of what each worker holds: which inputs a cell must send to which rank."""

from __future__ import annotations

from sky_jupyter.notebook.syncbook import OWN, SyncBook

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def cell(book: SyncBook, rank: int, hashes: dict[str, str], result: dict | None = None, incarnation: int = 1,
         failed: bool = False) -> list[str]:
    """One cell on ``rank`` reading ``hashes``: what it sends; then its end as ``result`` says (default: fine)."""
    send = book.to_send(rank, incarnation, hashes)
    book.cell_done(rank, send, hashes, None if failed else (result or {}))
    book.shipped(hashes, send)
    return send


def test_an_input_goes_once_per_worker_and_again_when_it_changes():
    book = SyncBook()
    assert cell(book, 0, {"data": "h1", "cfg": "c1"}) == ["cfg", "data"]
    assert cell(book, 0, {"data": "h1", "cfg": "c1"}) == []
    assert cell(book, 1, {"data": "h1"}) == ["data"]  # another rank holds nothing yet
    assert cell(book, 0, {"data": "h2", "cfg": "c1"}) == ["data"]


def test_a_replaced_worker_holds_nothing():
    book = SyncBook()
    cell(book, 0, {"data": "h1"}, incarnation=1)
    assert book.to_send(0, 2, {"data": "h1"}) == ["data"]
    assert book.held[0] == {}


def test_what_a_rank_computed_is_not_overwritten_by_the_copy_that_came_back():
    book = SyncBook()
    cell(book, 0, {}, {"bound": ["rank_seed"]})
    cell(book, 1, {}, {"bound": ["rank_seed"]})
    book.notebook_copy("rank_seed", "from-rank-0")  # rank 0's value came back to the notebook
    assert book.held[1]["rank_seed"] == OWN
    # The notebook's copy unchanged since: each rank keeps its own.
    assert book.to_send(1, 1, {"rank_seed": "from-rank-0"}) == []
    # The notebook changed it: now it goes to every rank.
    assert book.to_send(1, 1, {"rank_seed": "edited"}) == ["rank_seed"]


def test_an_input_changed_in_place_on_a_node_stays_the_nodes():
    book = SyncBook()
    cell(book, 0, {"cfg": "c1"})
    cell(book, 0, {"cfg": "c1"}, {"changed": ["cfg"]})
    book.notebook_copy("cfg", "c2")  # the changed copy came back
    assert book.to_send(0, 1, {"cfg": "c2"}) == []


def test_a_failed_cell_leaves_what_it_was_sent_unknown():
    book = SyncBook()
    cell(book, 0, {"a": "1"})
    assert cell(book, 0, {"a": "1", "b": "2"}, failed=True) == ["b"]
    assert book.to_send(0, 1, {"a": "1", "b": "2"}) == ["b"]  # sent again; "a" was not resent, so still held


def test_a_deleted_name_is_forgotten_and_a_handle_is_never_the_notebooks_copy():
    book = SyncBook()
    cell(book, 0, {"x": "1"})
    cell(book, 0, {}, {"missing": ["x"]})
    assert "x" not in book.held[0]
    book.notebook_copy("big", "h")
    book.notebook_copy("big", None)  # the notebook now holds a sky.Remote handle instead
    assert "big" not in book.notebook


def test_a_pulled_value_is_known_to_be_on_its_node():
    book = SyncBook()
    book.node_keeps(2, 7, "model")
    book.notebook_copy("model", "m1")
    assert book.to_send(2, 7, {"model": "m1"}) == []
    assert book.to_send(2, 8, {"model": "m1"}) == ["model"]  # unless that worker was replaced since
