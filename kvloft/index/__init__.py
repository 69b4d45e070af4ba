"""Retrievers, one file per method, all behind the protocol in base.py.

Methods are imported lazily by `make_retriever`, so a method's optional dependencies
(faiss, numba) load only when it is used.
"""

from kvloft.index.base import Retriever, Selection, make_retriever, register

__all__ = ["Retriever", "Selection", "make_retriever", "register"]
