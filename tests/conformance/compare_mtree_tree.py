#!/usr/bin/env python3
"""Compare two `info mtree -D` texts (with or without -o), ignoring the order
of the blocks (QEMU prints address-space groups in hash-table order, and the
alias targets in the order it met them) and the order of the `address-space:`
lines heading one block. Exit 0 when equal."""
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from mtree_text import main  # noqa: E402

if __name__ == '__main__':
    main(sys.argv, 'address-space: ', (), 'compare_mtree_tree.py', 'blocks')
