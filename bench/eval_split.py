"""`kvloft eval` with decode attention in two launches (static tier, then the selection, then
a merge: the path before runtime/rowspace.py), for A/B runs of the one-launch path.
Usage: python bench/eval_split.py EVAL_ARGS... (the arguments of `kvloft eval`)."""

import sys

from kvloft.cli import main
from kvloft.runtime import attention

_init = attention.TieredAttention.__init__


def _split_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.one_launch = False


attention.TieredAttention.__init__ = _split_init
sys.exit(main(["eval", *sys.argv[1:]]))
