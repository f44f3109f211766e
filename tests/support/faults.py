"""gRPC server interceptors that make a worker's Generate misbehave while the rest of its
service (state stream, info, health) keeps working, so the router keeps choosing it."""

from __future__ import annotations

import asyncio

import grpc


class _GenerateFault(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    async def fault(self, context: grpc.aio.ServicerContext) -> None:
        raise NotImplementedError

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/Generate"):
            return handler

        async def generate(request, context):
            self.calls += 1
            await self.fault(context)
            yield  # unreachable; makes this a server-streaming handler

        return handler._replace(unary_stream=generate)


class FailGenerate(_GenerateFault):
    """Generate fails with UNAVAILABLE before any output."""

    async def fault(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")


class HangGenerate(_GenerateFault):
    """Generate never answers."""

    async def fault(self, context: grpc.aio.ServicerContext) -> None:
        await asyncio.Event().wait()
