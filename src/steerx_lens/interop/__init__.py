"""Vectors that travel: convert to and from the steering tools users already have.

- ``steering-vectors``: :func:`from_steering_vectors`, :func:`to_steering_vectors`;
- repeng: :func:`from_repeng`, :func:`to_repeng`;
- llama.cpp GGUF control vectors: :func:`export_gguf`, :func:`import_gguf`.

Tensors are kept bit for bit in both directions. The other libraries steer every token
position and give the strength where the vector is applied (``multiplier``, ``coeff``,
``--control-vector-scaled``), so apply converted vectors with :func:`as_steers`
(``positions="all"``; ``alpha`` is that strength). The optional packages are imported only when
a conversion needs them: ``pip install 'steerx-lens[interop]'``.
"""

from steerx_lens.interop._common import as_steers
from steerx_lens.interop.gguf import export_gguf, import_gguf
from steerx_lens.interop.repeng import from_repeng, to_repeng
from steerx_lens.interop.steering_vectors import from_steering_vectors, to_steering_vectors

__all__ = [
    "as_steers",
    "export_gguf",
    "from_repeng",
    "from_steering_vectors",
    "import_gguf",
    "to_repeng",
    "to_steering_vectors",
]
