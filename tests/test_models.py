"""LeNet-5 as built by ``sparseconv.models.lenet5`` against NOTES section 4.

Parameter counts, LeCun's connection counts (``nnz`` of each layer's sparse matrix plus its
biased outputs, computed here from the matrices), and C3's connection table transcribed
independently from the printed X/. table in NOTES.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sparseconv.models import C3_TABLE, LENET5_LAYERS, LENET5_TABLE, lenet5
from sparseconv.nn import Conv2d, Linear, Subsampling2d

# NOTES section 4, copied as printed: rows are S2 maps, columns C3 maps.
NOTES_C3_TABLE = """
    S2 0:    X . . . X X X . . X X  X  X  .  X  X
    S2 1:    X X . . . X X X . . X  X  X  X  .  X
    S2 2:    X X X . . . X X X . .  X  .  X  X  X
    S2 3:    . X X X . . X X X X .  .  X  .  X  X
    S2 4:    . . X X X . . X X X X  .  X  X  .  X
    S2 5:    . . . X X X . . X X X  X  .  X  X  X
"""

# NOTES section 4: layer -> (parameters, connections). NOTES prints 12 parameters for S4, but
# S4 has 16 maps with one trainable beta and one bias each, i.e. 32 (LeCun et al. 1998 also
# say 32; the 12 is S2's count repeated). The network must have 32.
NOTES_TABLE = {
    "C1": (156, 122_304),
    "S2": (12, 5_880),
    "C3": (1_516, 151_600),
    "S4": (32, 2_000),
    "C5": (48_120, 48_120),
    "F6": (10_164, 10_164),
}

LAYER_TYPES = {"C1": Conv2d, "S2": Subsampling2d, "C3": Conv2d, "S4": Subsampling2d, "C5": Conv2d, "F6": Linear,
               "OUT": Linear}


def _parse_table(text: str) -> np.ndarray:
    rows = [line.split(":")[1].split() for line in text.strip().splitlines()]
    return np.array([[mark == "X" for mark in row] for row in rows])


@pytest.fixture(scope="module")
def net():
    return lenet5(dtype=np.float64, seed=0)


@pytest.fixture(scope="module")
def input_shapes(net):
    """One sample's input shape for every layer of the network."""
    shapes, shape = [], (1, 32, 32)
    for layer in net:
        shapes.append(shape)
        shape = layer.output_shape(shape)
    return shapes


def _matrix_and_outputs(layer, shape):
    """The layer's matrix on flattened samples and its number of outputs."""
    matrix, bias = layer.export(shape)
    return matrix, (0 if bias is None else matrix.shape[0])


def test_layer_positions_and_types(net):
    for name, index in LENET5_LAYERS.items():
        assert isinstance(net[index], LAYER_TYPES[name]), name


@pytest.mark.parametrize("name", list(NOTES_TABLE))
def test_parameter_counts(net, name):
    layer = net[LENET5_LAYERS[name]]
    expected = NOTES_TABLE[name][0]
    assert layer.n_params() == expected
    if name != "S4":  # see NOTES_TABLE: the table's S4 entry repeats S2's 12
        assert LENET5_TABLE[name][0] == expected


@pytest.mark.parametrize("name", list(NOTES_TABLE))
def test_connection_counts_are_nnz_plus_biased_outputs(net, input_shapes, name):
    index = LENET5_LAYERS[name]
    layer = net[index]
    matrix, biased_outputs = _matrix_and_outputs(layer, input_shapes[index])
    nnz = matrix.nnz if sp.issparse(matrix) else np.count_nonzero(matrix)
    assert nnz + biased_outputs == NOTES_TABLE[name][1]
    assert LENET5_TABLE[name][1] == NOTES_TABLE[name][1]
    assert layer.connections(input_shapes[index]) == NOTES_TABLE[name][1]


def test_layer_shapes(net, input_shapes):
    expected = {"C1": (1, 32, 32), "S2": (6, 28, 28), "C3": (6, 14, 14), "S4": (16, 10, 10), "C5": (16, 5, 5),
                "F6": (120,), "OUT": (84,)}
    for name, shape in expected.items():
        assert input_shapes[LENET5_LAYERS[name]] == shape, name
    assert net.output_shape((1, 32, 32)) == (10,)


def test_total_parameters(net):
    # C1 + S2 + C3 + S4 + C5 + F6 + output layer (84 * 10 + 10)
    assert net.n_params() == 156 + 12 + 1_516 + 32 + 48_120 + 10_164 + 850


def test_c3_table_matches_notes():
    table = _parse_table(NOTES_C3_TABLE)
    assert table.shape == (6, 16)
    assert table.sum() == 60
    np.testing.assert_array_equal(C3_TABLE, table)


def test_c3_matrix_follows_the_table(net, input_shapes):
    index = LENET5_LAYERS["C3"]
    layer = net[index]
    table = _parse_table(NOTES_C3_TABLE)  # (S2 map, C3 map)
    np.testing.assert_array_equal(layer.weight.mask[:, :, 0, 0], table.T)
    matrix, _ = layer.export(input_shapes[index])
    assert matrix.shape == (16 * 10 * 10, 6 * 14 * 14)
    assert matrix.nnz == 60 * 25 * 100 == 150_000
    blocks = sp.csr_array(matrix)
    for s2 in range(6):
        for c3 in range(16):
            block = blocks[c3 * 100:(c3 + 1) * 100, s2 * 196:(s2 + 1) * 196]
            assert block.nnz == (2_500 if table[s2, c3] else 0), (s2, c3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_output_shape_and_dtype(dtype):
    net = lenet5(dtype=dtype, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(dtype)
    y = net.forward(x)
    assert y.shape == (3, 10)
    assert y.dtype == dtype
    dx = net.backward(np.ones_like(y))
    assert dx.dtype == dtype
    assert all(p.data.dtype == dtype and p.grad.dtype == dtype for p in net.parameters())


def test_same_seed_same_network():
    a, b, c = lenet5(seed=3), lenet5(seed=3), lenet5(seed=4)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    assert not np.array_equal(a[0].weight.data, c[0].weight.data)


def test_unbuilt_network_builds_on_first_forward():
    net = lenet5(build=False, seed=0)
    assert net.forward(np.zeros((1, 1, 32, 32), dtype=np.float32)).shape == (1, 10)
    np.testing.assert_array_equal(net.forward(np.ones((2, 1, 32, 32), dtype=np.float32)),
                                  lenet5(seed=0).forward(np.ones((2, 1, 32, 32), dtype=np.float32)))
