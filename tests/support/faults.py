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


class GateGenerate(grpc.aio.ServerInterceptor):
    """Generate sends its first message, then holds the rest until ``gate`` is set: streams
    stay open (and their requests in flight) for as long as a test needs."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.held = 0  # streams waiting at the gate now

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/Generate"):
            return handler
        inner = handler.unary_stream

        async def generate(request, context):
            first = True
            async for message in inner(request, context):
                yield message
                if first:
                    first = False
                    self.held += 1
                    try:
                        await self.gate.wait()
                    finally:
                        self.held -= 1

        return handler._replace(unary_stream=generate)
