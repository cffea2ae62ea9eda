#!/usr/bin/env python3
"""Compare two `info mtree -D` texts, ignoring the order of the blocks (QEMU
prints address-space groups in hash-table order, and the alias targets in the
order it met them) and the order of the `address-space:` lines heading one
block. Every other character must match. Exit 0 when equal."""
import difflib, sys

def blocks(text):
    out = []
    for b in text.strip('\n').split('\n\n'):
        lines = [l for l in b.split('\n') if l.strip()]
        heads = sorted(l for l in lines if l.startswith('address-space: '))
        out.append('\n'.join(heads + [l for l in lines if not l.startswith('address-space: ')]))
    return sorted(b for b in out if b)

def main():
    if len(sys.argv) != 3:
        sys.exit('usage: compare_mtree_tree.py EXPECTED ACTUAL')
    exp, act = (blocks(open(p).read()) for p in sys.argv[1:])
    if exp == act:
        print(f'identical ({len(exp)} blocks)')
        return
    sys.stdout.writelines(l + '\n' for l in difflib.unified_diff(
        '\n\n'.join(exp).split('\n'), '\n\n'.join(act).split('\n'),
        'expected', 'actual', lineterm='', n=1))
    sys.exit(1)

if __name__ == '__main__':
    main()
