"""registry.inputs: model inputs checked and encoded against a version's input spec."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import InvalidInput
from registry.inputs import check_inputs, encode_rows, expected_text, input_digest, is_tabular
from training.datasets import delivery_eta
from training.datasets.tabular import encode_table

DIGITS_SPEC = {
    "shape": [8, 8, 1],
    "dtype": "float32",
    "preprocessing": {"kind": "image", "scale": 1 / 16, "offset": 0.0},
}
TABLE_SPEC = {
    "shape": [5],
    "dtype": "float32",
    "preprocessing": {
        "kind": "tabular",
        "columns": [
            {"name": "distance_km", "type": "numeric"},
            {"name": "hour", "type": "numeric"},
            {"name": "city", "type": "categorical", "vocabulary": ["berlin", "london", "madrid"], "encoding": "one-hot"},
        ],
        "features": ["distance_km", "hour", "city=berlin", "city=london", "city=madrid"],
        "normalization": "in-model",
        "unknown_category": "all-zero one-hot block",
    },
}


def test_one_example_gets_a_batch_axis_and_a_batch_keeps_its_own():
    one = np.random.default_rng(0).random((8, 8, 1)).tolist()
    batch = check_inputs(one, DIGITS_SPEC)
    assert batch.shape == (1, 8, 8, 1) and batch.dtype == np.float32 and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch[0], np.asarray(one, dtype=np.float32))
    three = check_inputs([one, one, one], DIGITS_SPEC)
    assert three.shape == (3, 8, 8, 1)
    ints = check_inputs(np.zeros((2, 8, 8, 1), dtype=np.int64), DIGITS_SPEC)
    assert ints.dtype == np.float32


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ([[0.0] * 8] * 8, ["shape [8, 8]", "[8, 8, 1]", "[N, 8, 8, 1]", "float32"]),
        (np.zeros((2, 8, 8, 3)).tolist(), ["shape [2, 8, 8, 3]", "[N, 8, 8, 1]"]),
        ([[[0.0]] * 8, [[0.0]] * 7], ["ragged", "[8, 8, 1]"]),
        (np.full((8, 8, 1), "a").tolist(), ["text", "float32"]),
        (np.full((8, 8, 1), True).tolist(), ["booleans", "float32"]),
        (np.zeros((0, 8, 8, 1)), ["empty batch"]),
        (None, ["no inputs"]),
        ("hello", ["text"]),
    ],
)
def test_wrong_inputs_are_refused_naming_shape_and_dtype(inputs, words):
    with pytest.raises(InvalidInput) as caught:
        check_inputs(inputs, DIGITS_SPEC)
    for word in words:
        assert word in str(caught.value)


def test_non_finite_and_out_of_range_values_are_refused_with_their_position():
    x = np.zeros((2, 8, 8, 1))
    x[1, 3, 4, 0] = np.nan
    with pytest.raises(InvalidInput, match=r"non-finite.*\[1, 3, 4, 0\]"):
        check_inputs(x, DIGITS_SPEC)
    x[1, 3, 4, 0] = 1e300  # finite in float64, infinite in float32
    with pytest.raises(InvalidInput, match="float32's range"):
        check_inputs(x.tolist(), DIGITS_SPEC)


def test_integer_specs_take_whole_numbers_in_range():
    spec = {"shape": [4], "dtype": "int32"}
    assert check_inputs([1, 2, 3, 4], spec).dtype == np.int32
    assert check_inputs([[1.0, 2.0, 3.0, 4.0]], spec).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(InvalidInput, match="whole numbers"):
        check_inputs([1, 2.5, 3, 4], spec)
    with pytest.raises(InvalidInput, match="outside int32"):
        check_inputs([1, 2, 3, 2**40], spec)


def test_rows_are_laid_out_as_the_spec_features_with_one_hot_blocks():
    x = encode_rows(
        [
            {"distance_km": 2.5, "hour": 19, "city": "london"},
            {"city": "madrid", "hour": "12", "distance_km": "0.75"},  # CSV cells are text
            {"distance_km": 1, "hour": 10, "city": "paris"},  # unknown: all-zero block
        ],
        TABLE_SPEC,
    )
    assert x.dtype == np.float32 and x.shape == (3, 5)
    np.testing.assert_array_equal(
        x, np.asarray([[2.5, 19, 0, 1, 0], [0.75, 12, 0, 0, 1], [1, 10, 0, 0, 0]], dtype=np.float32)
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"distance_km": 1, "hour": 2, "city": "berlin"}, {"distance_km": 1, "city": "berlin"}], "row 1: missing column 'hour'"),
        ([{"distance_km": 1, "hour": 2, "city": "berlin", "colour": "red"}], "row 0: unknown column 'colour'"),
        ([{"distance_km": "far", "hour": 2, "city": "berlin"}], "row 0, column 'distance_km': 'far' is not a number"),
        ([{"distance_km": True, "hour": 2, "city": "berlin"}], "row 0, column 'distance_km'"),
        ([{"distance_km": float("nan"), "hour": 2, "city": "berlin"}], "row 0, column 'distance_km'.*not a finite"),
        ([{"distance_km": "inf", "hour": 2, "city": "berlin"}], "not a finite"),
        ([{"distance_km": 1, "hour": 2, "city": 3.5}], "row 0, column 'city'"),
        ([], "no rows"),
        ({"distance_km": 1}, "list of objects"),
        ([[1, 2, 3]], "row 0: expected an object"),
    ],
)
def test_bad_rows_are_refused_naming_row_and_column(rows, message):
    with pytest.raises(InvalidInput, match=message):
        encode_rows(rows, TABLE_SPEC)


def test_unknown_categories_are_refused_when_the_spec_does_not_say_what_to_do():
    spec = {**TABLE_SPEC, "preprocessing": {k: v for k, v in TABLE_SPEC["preprocessing"].items() if k != "unknown_category"}}
    with pytest.raises(InvalidInput, match="row 0, column 'city': unknown category 'paris'; expected one of: berlin, london, madrid"):
        encode_rows([{"distance_km": 1, "hour": 2, "city": "paris"}], spec)


def test_rows_need_a_tabular_spec():
    assert not is_tabular(DIGITS_SPEC) and is_tabular(TABLE_SPEC)
    with pytest.raises(InvalidInput, match="not tabular"):
        encode_rows([{"a": 1}], DIGITS_SPEC)


def test_rows_reproduce_the_training_encoding_of_delivery_eta():
    """The same raw rows give exactly the arrays central training fed the model."""
    raw = delivery_eta.generate_orders(200)
    columns = {name: [str(v) for v in values] for name, values in raw.items()}
    dataset = encode_table(columns, "eta_min", name="delivery-eta", task="regression")
    spec = dataset.input_spec()
    rows = [{name: raw[name][i].item() for name in raw if name != "eta_min"} for i in range(200)]
    x = encode_rows(rows, spec)
    full = np.concatenate([dataset.x_train, dataset.x_val, dataset.x_test])
    assert x.shape == (200, *dataset.input_shape)
    # the dataset is split and shuffled: compare as sets of rows
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, full.tolist()))
    assert check_inputs(x, spec).shape == x.shape
    assert "[N, " in expected_text(spec)


def test_digest_depends_on_the_numbers_not_on_how_they_came():
    a = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1)
    assert input_digest(a) == input_digest(check_inputs(a.tolist(), DIGITS_SPEC))
    assert input_digest(a) == input_digest(a.astype(">f4"))
    assert input_digest(a) != input_digest(a.reshape(1, 64))
    assert input_digest(a) != input_digest(a + 1)
