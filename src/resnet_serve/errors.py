"""The service's error family: each class knows its HTTP status and code; ``http.errors`` maps
them to responses once."""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error the service reports to a client."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(ServeError):
    """The API key is missing or wrong (deliberately says no more)."""

    status_code = 401
    code = "unauthorized"


class ModelNotFound(ServeError):
    """The request names a model this server does not serve."""

    status_code = 404
    code = "model_not_found"


class NotFound(ServeError):
    """No such endpoint (the protocol routes' own 404)."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(ServeError):
    """The endpoint exists, but not for this method."""

    status_code = 405
    code = "method_not_allowed"


class ModelControlDisabled(ServeError):
    """Loading and unloading models on request is off (``RESNET_SERVE_MODEL_CONTROL``)."""

    status_code = 403
    code = "model_control_disabled"


class LoadFailed(ServeError):
    """A model asked to load cannot be (Triton answers 400); what was served before still is."""

    status_code = 400
    code = "load_failed"


class ModelUnavailable(ServeError):
    """The model exists but cannot serve now (its artefact is missing or damaged)."""

    status_code = 503
    code = "model_unavailable"


class MissingFile(ServeError):
    """The request carries no image (no ``file`` field, or more than one)."""

    status_code = 422
    code = "missing_file"


class MalformedRequest(ServeError):
    """The request body cannot be parsed (broken multipart, client gone mid-upload)."""

    status_code = 400
    code = "malformed_request"


class UploadTimeout(ServeError):
    """The upload did not arrive within the request deadline."""

    status_code = 408
    code = "upload_timeout"


class InvalidParameter(ServeError):
    """A query parameter is out of range for this model (a class index it does not have)."""

    status_code = 422
    code = "invalid_parameter"


class InvalidImage(ServeError):
    """The bytes are empty, truncated or corrupt."""

    status_code = 400
    code = "invalid_image"


class UnsupportedMediaType(ServeError):
    """The bytes are not an image format we decode, or the request body type is wrong."""

    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ServeError):
    """The upload exceeds the byte limit, or the image exceeds the pixel limit."""

    status_code = 413
    code = "payload_too_large"

    @classmethod
    def upload_over(cls, limit_bytes: int) -> PayloadTooLarge:
        """The one wording for the byte limit, whether an HTTP body or a file on disk passed it."""
        return cls(f"the upload exceeds the {limit_bytes / 1024 / 1024:g} MB limit")


class HeadersTooLarge(ServeError):
    """The request line and headers are past their size limit (answered by ``http.connections``,
    below the app, as the headers are still arriving)."""

    status_code = 431
    code = "headers_too_large"


class Overloaded(ServeError):
    """The queue is full; the client should retry later."""

    status_code = 503
    code = "overloaded"


class NotReady(ServeError):
    """The model is not loaded or warmed yet, or the service is shutting down."""

    status_code = 503
    code = "not_ready"


class DeadlineExceeded(ServeError):
    """The request did not finish within its deadline."""

    status_code = 504
    code = "deadline_exceeded"


class InferenceFailed(ServeError):
    """The model raised while running the batch this request was in."""

    status_code = 500
    code = "inference_failed"


class ExplanationsUnavailable(ServeError):
    """This server cannot explain this model: no torch here, or no eager weights in its folder."""

    status_code = 501
    code = "explanations_unavailable"


class WeightsError(Exception):
    """The model's weights cannot be found, verified or loaded (a start-up error, not HTTP)."""


class RepositoryError(Exception):
    """A model repository, or a model in it, cannot be used as it is (a start-up error)."""


class ExportError(Exception):
    """A model cannot be exported as asked: its weights, labels or artefacts do not fit."""


class ServerUnreachable(Exception):
    """A client cannot reach the server at all (not an answer about one image)."""


class OutputFailed(Exception):
    """Rows cannot be written where asked (a missing folder, a full disk); the rows written stay."""


class OutputClosed(OutputFailed):
    """The reader of the rows went away (``| head``): the run stops without a word."""


class ServerRefused(Exception):
    """The server answers, but refuses what every request of a run needs (a wrong API key, a
    model it does not have), so the run stops rather than write the same error for each input."""
