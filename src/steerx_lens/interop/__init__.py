"""Vectors that travel: convert to and from the steering tools users already have.

- ``steering-vectors``: :func:`from_steering_vectors`, :func:`to_steering_vectors`;
- repeng: :func:`from_repeng`, :func:`to_repeng`;
- llama.cpp GGUF control vectors: :func:`export_gguf`, :func:`import_gguf`.

Tensors are kept bit for bit in both directions. The other libraries steer every token
position and give the strength where the vector is applied (``multiplier``, ``coeff``,
``--control-vector-scaled``), so apply converted vectors with :func:`as_steers`
(``positions="all"``; ``alpha`` is that strength). The other libraries are imported only when a
conversion needs them (see "Bring your vectors" in the docs for how to install them). A vector that cannot be
converted as asked raises :class:`InteropError` with a message that says what to do.

Several layers travel together: every import gives one vector per layer (wrap them in a
:class:`~steerx_lens.vectors.SteeringVectorSet` to apply, save and load them as one), and every
export takes a list of vectors or a ``SteeringVectorSet``; round trips stay bit-exact.
"""

from steerx_lens.interop._common import InteropError, as_steers
from steerx_lens.interop.gguf import export_gguf, import_gguf
from steerx_lens.interop.repeng import from_repeng, to_repeng
from steerx_lens.interop.steering_vectors import (
    from_layer_tensors,
    from_steering_vectors,
    to_layer_tensors,
    to_steering_vectors,
)

__all__ = [
    "InteropError",
    "as_steers",
    "export_gguf",
    "from_layer_tensors",
    "from_repeng",
    "from_steering_vectors",
    "import_gguf",
    "to_layer_tensors",
    "to_repeng",
    "to_steering_vectors",
]
