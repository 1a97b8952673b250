"""The measured GEMM layout of decode-sized batches: the same product either way, chosen per row count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mace.model import linear_layout
from mace.model.linear_layout import MAX_ROWS, LayoutLinear, LayoutTable


def _linear(table: LayoutTable, bias: bool = True) -> LayoutLinear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160, bias=bias))
    linear_layout.apply(model, "standard", [torch.get_num_threads()])
    layer = model[0]
    assert isinstance(layer, LayoutLinear)
    layer.layout = table
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, MAX_ROWS])
def test_both_layouts_give_nn_linears_product(rows: int, bias: bool) -> None:
    threads = torch.get_num_threads()
    transposed = _linear(LayoutTable({threads: frozenset(range(1, MAX_ROWS + 1))}), bias)
    x = torch.randn(rows, 96)
    expected = nn.functional.linear(x, transposed.weight, transposed.bias)
    out = transposed(x)
    assert out.is_contiguous() and out.shape == (rows, 160)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_table_decides_by_row_count_and_thread_count() -> None:
    threads = torch.get_num_threads()
    table = LayoutTable({threads: frozenset({2})})
    assert table.is_transposed(2) and not table.is_transposed(3)
    assert not LayoutTable({threads + 1: frozenset({2})}).is_transposed(2)  # not measured for this count


def test_training_shaped_inputs_keep_the_standard_path() -> None:
    layer = _linear(LayoutTable({torch.get_num_threads(): frozenset(range(1, MAX_ROWS + 1))}))
    x = torch.randn(1, 4, 96, requires_grad=True)  # [batch, tokens, hidden]
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_tuning_measures_every_row_count_up_to_the_bound() -> None:
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(4)])
    table = linear_layout.apply(model, "auto", [1])
    assert set(table.transposed) == {1}
    assert table.transposed[1] <= frozenset(range(1, MAX_ROWS + 1))
    assert all(isinstance(layer, LayoutLinear) and layer.layout is table for layer in model)
