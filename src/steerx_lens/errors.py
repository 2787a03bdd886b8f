"""Exceptions raised by steerx_lens. Each names the problem and what to do about it."""

from __future__ import annotations


class SteerXError(Exception):
    """Base class of every steerx_lens error."""


class UnknownSiteError(SteerXError, KeyError):
    """A hook site name that the model does not have (wrong name, or layer out of range)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VectorShapeError(SteerXError, ValueError):
    """A vector or activation tensor whose width or rank does not fit the site."""


class BatchMismatchError(SteerXError, ValueError):
    """Per-row vectors (or patch sources) whose batch size differs from the input batch."""


class NonFiniteError(SteerXError, ValueError):
    """A vector or activation tensor that contains NaN or infinity."""


class ModelMismatchError(SteerXError, ValueError):
    """A vector computed on a different model than the one it is applied to."""


class PositionError(SteerXError, ValueError):
    """A position specification that cannot be applied to the current input."""


class BackendError(SteerXError, TypeError):
    """A model object that no steerx_lens backend supports, or an unsupported operation."""


class ContextLengthError(SteerXError, ValueError):
    """An input (history + text, or prompt + new tokens) longer than the model's context."""


class InterventionTypeError(SteerXError, TypeError):
    """An object passed where an intervention is expected (hooks.Steer, a SteeringVector, ...)."""


class DataError(SteerXError, ValueError):
    """User data that cannot be used: a file that is not UTF-8 or not JSON, a wrong field, a
    duplicate user id, or no usable user left; the message names the file and line, or the
    user and item."""


class OutputLockedError(SteerXError, RuntimeError):
    """An output folder that another run is writing to (see :func:`steerx_lens.runs.out_lock`)."""


class ResidualNormError(SteerXError, ValueError):
    """A strength relative to the residual norm for a vector whose site's norm is unknown (or
    zero), or an invalid recorded norm: give an absolute ``alpha`` or record ``residual_norm``."""


class InputTypeError(SteerXError, TypeError):
    """A text of a kind a backbone cannot read: pass strings, ``(prompt, response)`` tuples,
    ``HistoryItem`` s, ``backbones.Sample`` s or ``text.EncodedText`` s."""
