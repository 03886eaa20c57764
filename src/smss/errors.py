"""The one exception tree of SMSS.

Every error the platform raises on purpose is a :class:`SmssError` with a
stable machine-readable ``code`` and a plain ``message`` that is safe to show a
client (no paths, SQL, tokens or tracebacks: those go to the server log).
The HTTP status of each type lives in one place, ``smss.api.errors``; nothing
here knows about HTTP.

::

    SmssError
    ├── InvalidInput            the request is wrong (shape, datatype, names, JSON)
    │   ├── PayloadTooLarge     the body or a tensor exceeds a size limit
    │   ├── UnsupportedMediaType  a state-changing route's body is not of its declared type
    │   ├── RequestTimeout      the client sent its request too slowly (closed)
    │   └── MisdirectedRequest  the Host header names another server (DNS rebinding)
    ├── InvalidSpec             a model, function or workflow definition is wrong
    ├── UnsafeArtifact          weights or code refused (pickle, path traversal)
    ├── NotFound                unknown function, version, run or instance
    ├── Conflict                a name or idempotency key already used differently
    ├── AuthError               missing or wrong admin token
    │   └── Forbidden           a valid caller asked for something not allowed
    │       └── CrossSiteRequest  a state-changing request from another web origin
    ├── Overloaded              queue full: come back later (429)
    ├── Unavailable             cannot serve now: starting failed, instance died (503)
    │   ├── StartFailed         an instance could not be started (load error)
    │   │   └── CorruptWeights  a weight segment failed its checksum at attach
    │   ├── InstanceLost        an instance died with the request in flight
    │   │   └── InstanceDraining  an instance refused a request it never ran (it drains)
    │   ├── StorageUnavailable  the store could not durably record an event
    │   │   └── StorageUnreachable  the database cannot be reached now: retry (it recovers)
    │   └── RunNotOwned         another live engine drives the run
    ├── DeadlineExceeded        the request's deadline passed (504)
    └── ModelError              the user's predict() raised (500)
"""

from __future__ import annotations


class SmssError(Exception):
    """Base of every deliberate SMSS error."""

    code: str = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message


class InvalidInput(SmssError):
    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class RequestTimeout(InvalidInput):
    code = "request_timeout"


class MisdirectedRequest(InvalidInput):
    code = "misdirected_request"


class InvalidSpec(SmssError):
    code = "invalid_spec"


class UnsafeArtifact(SmssError):
    code = "unsafe_artifact"


class NotFound(SmssError):
    code = "not_found"


class Conflict(SmssError):
    code = "conflict"


class AuthError(SmssError):
    code = "unauthorized"


class Forbidden(AuthError):
    code = "forbidden"


class CrossSiteRequest(Forbidden):
    code = "cross_site_request"


class Overloaded(SmssError):
    code = "overloaded"


class Unavailable(SmssError):
    code = "unavailable"


class StartFailed(Unavailable):
    code = "start_failed"


class CorruptWeights(StartFailed):
    """A weight segment's data does not match the checksum written with it: the
    start fails, and the segment is dropped so the next start reloads the file."""

    code = "corrupt_weights"


class InstanceLost(Unavailable):
    code = "instance_lost"


class InstanceDraining(InstanceLost):
    """The instance stopped taking requests (it was sent SIGTERM) and refused this one
    without running it: it may be sent elsewhere, idempotent or not. The instance's
    requests in flight still finish there."""

    code = "instance_draining"


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


class StorageUnreachable(StorageUnavailable):
    """The database server could not be reached, or the connection to it was lost
    (PostgreSQL stopped or restarting): nothing of the request was acknowledged, and
    it may be retried; the store reconnects by itself when the server is back. A
    write whose COMMIT was cut off may still have committed: the log, read back, says."""

    code = "storage_unreachable"

    def __init__(self, message: str, *, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class RunNotOwned(Unavailable):
    """The run is driven by another engine (several engines share the PostgreSQL log),
    alive as far as anyone knows: this one's records for it are refused, nothing is written."""

    code = "run_not_owned"


class DeadlineExceeded(SmssError):
    code = "deadline_exceeded"


class ModelError(SmssError):
    code = "model_error"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        #: Names the failure in the server log, where its detail is (see smss.api.errors).
        self.request_id = request_id


__all__ = [
    "AuthError",
    "Conflict",
    "CorruptWeights",
    "CrossSiteRequest",
    "DeadlineExceeded",
    "Forbidden",
    "InstanceDraining",
    "InstanceLost",
    "InvalidInput",
    "InvalidSpec",
    "MisdirectedRequest",
    "ModelError",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "SmssError",
    "StartFailed",
    "StorageUnavailable",
    "Unavailable",
    "UnsafeArtifact",
    "UnsupportedMediaType",
]
