"""spot.tree: the one state-tree walker and the one bitwise comparator."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from spot.tree import first_difference, map_leaves, map_tensors
from tests.helpers import assert_bitwise_equal


def _nan(payload: int) -> torch.Tensor:
    """A float32 quiet NaN with the given payload bits."""
    bits = 0x7FC00000 | payload
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)


def _state():
    return {
        "model": {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(3)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "step": 7,
        "name": "run",
    }


def _clone(tree):
    return map_tensors(tree, lambda t: t.clone())


# map_leaves / map_tensors


def test_map_tensors_visits_depth_first_in_insertion_order():
    seen = []
    tree = {"b": torch.tensor(1), "a": [torch.tensor(2), {"z": torch.tensor(3), "y": 4}]}
    tree["c"] = (torch.tensor(5),)
    map_tensors(tree, lambda t: seen.append(int(t)) or t)
    assert seen == [1, 2, 3, 5]


def test_map_tensors_replaces_tensors_only_and_keeps_container_types():
    tree = {"l": [torch.tensor(1.0), 2], "t": (torch.tensor(3.0), "x"), "n": None}
    out = map_tensors(tree, lambda t: t * 10)
    assert type(out["l"]) is list and type(out["t"]) is tuple
    assert out["l"][1] == 2 and out["t"][1] == "x" and out["n"] is None
    assert float(out["l"][0]) == 10.0 and float(out["t"][0]) == 30.0
    assert float(tree["l"][0]) == 1.0  # the input is not modified
    assert list(out) == ["l", "t", "n"]


def test_map_tensors_keeps_a_leaf_fn_returns_unchanged():
    t = torch.ones(2)
    out = map_tensors({"a": t}, lambda x: x)
    assert out["a"] is t


def test_map_leaves_sees_every_non_container_leaf():
    seen = []
    map_leaves({"a": [1, (2, "s")], "b": {"c": None}}, lambda x: seen.append(x) or x)
    assert seen == [1, 2, "s", None]


def test_map_leaves_rebuilds_dict_subclasses_as_dicts():
    from collections import OrderedDict

    out = map_leaves(OrderedDict(b=1, a=2), lambda x: x + 1)
    assert type(out) is dict and list(out.items()) == [("b", 2), ("a", 3)]


# first_difference


def test_equal_trees_have_no_difference():
    assert first_difference(_state(), _clone(_state())) is None


def test_negative_zero_differs_from_zero():
    found = first_difference(torch.tensor([0.0, -0.0]), torch.tensor([0.0, 0.0]))
    assert found is not None and found.startswith("<root>[1]: bits differ")
    assert "0x80000000" in found and "0x00000000" in found


def test_nan_payloads_count():
    assert first_difference(_nan(1), _nan(1)) is None  # the same NaN is equal to itself
    found = first_difference(_nan(1), _nan(2))
    assert found is not None and "0x7fc00001" in found and "0x7fc00002" in found


def test_dtype_and_shape_differences():
    assert "dtype torch.float32 != torch.float64" in first_difference(
        torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    )
    assert "shape (2,) != (1, 2)" in first_difference(torch.zeros(2), torch.zeros(1, 2))


def test_integer_bool_and_half_tensors_compare_bitwise():
    for dtype in (torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16):
        a = torch.zeros(4, dtype=dtype)
        b = a.clone()
        assert first_difference(a, b) is None
        b[2] = 1
        assert first_difference(a, b).startswith("<root>[2]: bits differ"), dtype


def test_complex128_has_no_same_size_integer_but_still_compares():
    a = torch.zeros(3, dtype=torch.complex128)
    b = a.clone()
    b[1] = complex(0.0, -0.0)
    assert first_difference(a, b).startswith("<root>[1]: bits differ")


def test_non_contiguous_and_zero_dim_tensors():
    a = torch.arange(12.0).reshape(3, 4)
    assert first_difference(a.t(), a.t().contiguous()) is None
    b = a.clone()
    b[2, 1] = -1.0
    assert first_difference(a.t(), b.t()).startswith("<root>[1, 2]: bits differ")
    assert first_difference(torch.tensor(1.0), torch.tensor(2.0)).startswith("<root>: bits")


def test_the_path_names_the_first_difference():
    a, b = _state(), _clone(_state())
    b["model"]["weight"][1, 2] = 99.0
    b["optimizer"]["state"][0]["exp_avg"][0] = 2.0  # later in order: not the one reported
    found = first_difference(a, b)
    assert found.startswith("model.weight[1, 2]: bits differ: 5.0 ")
    assert "99.0" in found
    b["model"]["weight"] = a["model"]["weight"]
    assert first_difference(a, b).startswith("optimizer.state[0].exp_avg[0]: bits differ")


def test_missing_key_is_named():
    a, b = _state(), _clone(_state())
    del b["optimizer"]["state"][0]["exp_avg"]
    b["optimizer"]["extra"] = 1
    found = first_difference(a, b)
    assert found.startswith("keys differ at optimizer")
    assert "'extra'" in found
    del b["optimizer"]["extra"]
    found = first_difference(a, b)
    assert (
        found == "keys differ at optimizer.state[0]: only in first ['exp_avg'], only in second []"
    )


def test_lengths_types_and_plain_leaves():
    assert first_difference([1, 2], [1, 2, 3]) == "<root>: length 2 != 3"
    assert first_difference({"a": torch.zeros(1)}, {"a": [0.0]}) == "a: Tensor vs list"
    assert first_difference({"a": 1}, {"a": {"b": 1}}) == "a: int vs dict"
    assert first_difference({"lr": 0.1}, {"lr": 0.2}) == "lr: 0.1 != 0.2"
    # A list equals a tuple of the same items (a serializer may turn one into the other).
    assert first_difference({"betas": (0.9, 0.999)}, {"betas": [0.9, 0.999]}) is None
    assert first_difference(math.nan, math.nan) is not None  # plain leaves compare with ==


def test_where_prefixes_the_path():
    found = first_difference({"w": torch.zeros(1)}, {"w": torch.ones(1)}, "model")
    assert found.startswith("model.w[0]: bits differ")


def test_meta_placeholders_have_no_data_to_compare():
    meta = torch.empty(2, device="meta")
    assert first_difference(meta, torch.empty(2, device="meta")) is None
    assert "device" in first_difference(meta, torch.zeros(2))


def test_bits_shown_most_significant_first():
    value = -2.5
    (bits,) = struct.unpack(">I", struct.pack(">f", value))
    found = first_difference(torch.tensor([value]), torch.tensor([0.0]))
    assert f"(0x{bits:08x})" in found


def test_assert_bitwise_equal_raises_with_the_difference():
    assert_bitwise_equal(_state(), _clone(_state()))
    b = _clone(_state())
    b["model"]["bias"][0] = -0.0
    with pytest.raises(AssertionError, match=r"^model\.bias\[0\]: bits differ"):
        assert_bitwise_equal(_state(), b)


# The walkers built on it keep their order and their types.


def test_broadcast_skeleton_round_trip():
    from spot.distributed.world import _fill_tensors, _strip_tensors

    tree = {"w": torch.arange(4.0), "opt": [torch.tensor(3), (torch.ones(2, dtype=torch.int8), 1)]}
    sent: list[torch.Tensor] = []
    skeleton = _strip_tensors(tree, sent)
    map_leaves(skeleton, lambda leaf: pytest.fail("a tensor left") if torch.is_tensor(leaf) else 0)
    received: list[torch.Tensor] = []
    rebuilt = _fill_tensors(skeleton, received)
    assert [t.dtype for t in received] == [torch.float32, torch.int64, torch.int8]
    for src, dst in zip(sent, received, strict=True):
        dst.copy_(src)
    assert type(rebuilt["opt"]) is list and type(rebuilt["opt"][1]) is tuple
    assert_bitwise_equal(tree, rebuilt)


def test_component_round_trip_keeps_non_dense_tensors_whole():
    from spot.checkpoint.tensorfile import _flatten, direct, rebuild

    sparse = torch.eye(3).to_sparse()
    state = {"m": {"b": torch.tensor([-0.0, 1.0]), "s": sparse, "a": [torch.arange(3), 5]}}
    tensors: list[torch.Tensor] = []
    skeleton = _flatten(state["m"], tensors)
    assert [t.tolist() for t in tensors] == [[-0.0, 1.0], [0, 1, 2]]  # in order, sparse not among
    assert skeleton["b"].device.type == "meta" and skeleton["s"].is_sparse
    component = direct(state)["m"]
    loaded = rebuild(component.skeleton, torch.cat(component.data))
    assert_bitwise_equal(state["m"], loaded)


def test_sparse_tensors_compare_their_dense_bits():
    a = torch.eye(3).to_sparse()
    assert first_difference(a, torch.eye(3).to_sparse()) is None
    b = torch.eye(3)
    b[2, 0] = 5.0
    assert first_difference(a, b.to_sparse()).startswith("<root>[2, 0]: bits differ")
    assert "layout" in first_difference(a, torch.eye(3))
