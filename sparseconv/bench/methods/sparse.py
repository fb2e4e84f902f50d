"""Method ``sparse``: :class:`sparseconv.ConvOperator` with its defaults (engine ``"auto"``, per product)."""

from ._engine import engine_method

NAME = "sparse"
RANK = 0
prepare = engine_method(NAME, None)
