"""Engines: the products of an operator behind one protocol (one module per engine)."""
