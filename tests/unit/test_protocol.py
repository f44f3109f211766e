"""The error codec of core/protocol.py, both directions without a server: what a worker ends an
RPC with (status and trailer) comes back to the router as the same error."""

from __future__ import annotations

import grpc
import pytest

from core import errors
from core.protocol import (
    ERROR_METADATA_KEY,
    error_from_rpc,
    error_metadata,
    status_code_for,
)


def crossed(error: errors.ElectronError) -> errors.ElectronError:
    """``error`` sent by a worker and read back by the router."""
    rpc = grpc.aio.AioRpcError(status_code_for(error), grpc.aio.Metadata(),
                               grpc.aio.Metadata(*error_metadata(error)), error.message)
    return error_from_rpc(rpc, "w1")


@pytest.mark.parametrize("error, status", [
    (errors.InvalidRequest("bad", param="temperature"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ContextLengthExceeded("long", param="messages"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound("which?", param="model"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequest("odd", param="tools", code="custom"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Overloaded("busy", retry_after=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NoWorkers("none", retry_after=3.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_a_worker_error_comes_back_as_the_same_class_and_fields(error, status):
    assert status_code_for(error) == status
    back = crossed(error)
    assert type(back) is type(error)
    assert (back.message, back.param, back.code) == (error.message, error.param, error.code)
    assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)


def test_non_ascii_messages_cross_as_plain_metadata():
    ((key, value),) = error_metadata(errors.InvalidRequest("température ✓", param="x"))
    assert key == ERROR_METADATA_KEY and value.isascii()
    assert crossed(errors.InvalidRequest("température ✓")).message == "température ✓"


@pytest.mark.parametrize("status", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_failed_worker_is_unavailable_whatever_its_trailer_says(status):
    trailer = grpc.aio.Metadata(*error_metadata(errors.InvalidRequest("bad")))
    back = error_from_rpc(grpc.aio.AioRpcError(status, grpc.aio.Metadata(), trailer, "x"), "w1")
    assert isinstance(back, errors.WorkerUnavailable) and "w1" in back.message


@pytest.mark.parametrize("status, expected", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequest),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded),
    (grpc.StatusCode.NOT_FOUND, errors.WorkerUnavailable),
])
def test_a_status_without_a_readable_trailer_maps_by_its_code(status, expected):
    for trailer in (grpc.aio.Metadata(), grpc.aio.Metadata((ERROR_METADATA_KEY, "{not json"))):
        back = error_from_rpc(grpc.aio.AioRpcError(status, grpc.aio.Metadata(), trailer, "why"),
                              "w1")
        assert type(back) is expected
