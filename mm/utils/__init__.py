"""Helpers every layer of mm may use: file writes, precision, processes, the host allocator, progress, modules.

Nothing here imports the rest of mm (tests/test_structure.py keeps it so)."""
