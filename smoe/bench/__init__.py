"""Benchmarks that ``smoe bench NAME`` runs, shipped inside the package so they work from an installed wheel: each
module has a ``main(argv)``. Its script in ``benchmarks/`` is a thin wrapper; the other scripts there need a source
checkout."""
