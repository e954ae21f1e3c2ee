"""Selection's own validation (construction, row counts, one host read) and zipvl.checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.sparsity.host_reads import HostReads
from zipvl.checks import check_int, check_scale
from zipvl.types import Selection


def _keep(rows: list[list[int]], s: int = 8) -> torch.Tensor:
    keep = torch.zeros(1, len(rows), s, dtype=torch.bool)  # (1, Hkv, S)
    for h, pos in enumerate(rows):
        keep[0, h, pos] = True
    return keep


def test_selection_construction_checks_what_the_host_knows() -> None:
    keep = _keep([[1, 5, 7]])
    with pytest.raises(ValueError, match=r"Selection\.keep: expected dtype in \(torch\.bool\)"):
        Selection(keep.int(), 3)
    with pytest.raises(ValueError, match=r"Selection\.keep: expected a 3-D tensor"):
        Selection(keep[0], 3)
    with pytest.raises(TypeError, match=r"Selection\.keep: expected a torch\.Tensor, got list"):
        Selection([[True]], 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Selection\.num_kept: expected an int, got float"):
        Selection(keep, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected an int >= 0, got -1"):
        Selection(keep, -1)
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected an int in \[0, Skv=8\]"):
        Selection(keep, 9)


def test_indices_refuse_counts_that_disagree_with_keep() -> None:
    # the review's case: keep = [1, 5, 7] with num_kept = 5 gave indices [1, 5, 7, 0, 2]
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected 3, .* got 5"):
        Selection(_keep([[1, 5, 7]]), 5).indices()
    with pytest.raises(ValueError, match=r"same number of kept tokens .* from 2 to 3"):
        Selection(_keep([[1, 5, 7], [0, 6]]), 2).indices()
    sel = Selection(_keep([[1, 5, 7], [0, 2, 6]]), 3)
    assert sel.indices().tolist() == [[[1, 5, 7], [0, 2, 6]]]


def test_check_counts_reads_once_and_remembers(monkeypatch: pytest.MonkeyPatch) -> None:
    sel = Selection(_keep([[1, 5, 7], [0, 2, 6]]), 3)
    reads = HostReads(monkeypatch)
    assert sel.check_counts() is sel
    assert reads.count == 1
    sel.check_counts()
    sel.indices()
    assert reads.count == 1
    fresh = dataclasses.replace(sel)  # a new selection is checked anew
    fresh.check_counts()
    assert reads.count == 2
    assert fresh == sel  # the remembered flag takes no part in equality
    # counts supplied by a caller that read them already: no read, same verdict
    other = Selection(sel.keep, 3)
    other.check_counts(count_range=(3, 3))
    assert reads.count == 2
    with pytest.raises(ValueError, match=r"Selection\.num_kept: expected 2"):
        Selection(sel.keep, 3).check_counts(count_range=(2, 2))


def test_check_counts_is_skipped_while_compiling() -> None:
    # a host read would break the graph; fullgraph=True proves there is none
    sel = Selection(_keep([[1, 5, 7], [0, 2, 6]]), 3)
    compiled = torch.compile(lambda: sel.indices(), fullgraph=True, backend="eager")
    assert compiled().tolist() == [[[1, 5, 7], [0, 2, 6]]]


def test_empty_selection_rows() -> None:
    sel = Selection(torch.zeros(0, 2, 5, dtype=torch.bool), 2)  # B = 0: nothing to disagree
    assert sel.indices().shape == (0, 2, 2)
    assert Selection(torch.zeros(1, 2, 0, dtype=torch.bool), 0).indices().shape == (1, 2, 0)


def test_check_int() -> None:
    assert check_int("n", 3, 1) == 3
    assert check_int("n", None, 0, optional=True) is None
    with pytest.raises(ValueError, match="n: expected an int >= 1, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(TypeError, match=r"n: expected an int, got float 16\.0"):
        check_int("n", 16.0, 1)
    with pytest.raises(TypeError, match="n: expected an int, got bool"):
        check_int("n", True, 0)
    with pytest.raises(TypeError, match="n: expected an int or None, got str"):
        check_int("n", "3", 0, optional=True)
    with pytest.raises(TypeError, match="n: expected an int, got NoneType"):
        check_int("n", None, 0)


def test_check_scale() -> None:
    assert check_scale("scale", None) is None
    assert check_scale("scale", 2) == 2.0 and isinstance(check_scale("scale", 2), float)
    for bad in (0, 0.0, -1.0, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="scale: expected a positive float or None"):
            check_scale("scale", bad)
    for bad_type in (True, "0.5", torch.tensor(0.5)):
        with pytest.raises(TypeError, match="scale: expected a positive float or None, got"):
            check_scale("scale", bad_type)
