"""Comparing two texts of QEMU's `info mtree` under the rule of README.md:
blocks (separated by blank lines) may come in any order, and so may the
heading lines of one block (`address-space:` lines of a tree block, ` AS `
lines of a flat view); `FlatView #N` numbers are ignored; every other
character must match. Used by compare_flatviews.py and compare_mtree_tree.py."""
import difflib
import sys


def blocks(text, heading, drop=()):
    """The blocks of `text` in a canonical form: lines starting with
    `heading` sorted, lines starting with one of `drop` left out."""
    out = []
    for b in text.strip('\n').split('\n\n'):
        lines = [l for l in b.split('\n') if l.strip() and not l.startswith(tuple(drop))]
        heads = sorted(l for l in lines if l.startswith(heading))
        out.append('\n'.join(heads + [l for l in lines if not l.startswith(heading)]))
    return sorted(b for b in out if b)


def main(argv, heading, drop, name, what):
    if len(argv) != 3:
        sys.exit(f'usage: {name} EXPECTED ACTUAL')
    # open() reads QEMU's CRLF line ends as '\n'.
    exp, act = (blocks(open(p).read(), heading, drop) for p in argv[1:])
    if exp == act:
        print(f'identical ({len(exp)} {what})')
        return
    sys.stdout.writelines(l + '\n' for l in difflib.unified_diff(
        '\n\n'.join(exp).split('\n'), '\n\n'.join(act).split('\n'),
        'expected', 'actual', lineterm='', n=1))
    sys.exit(1)
