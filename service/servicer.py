"""The NameGenerator servicer: request -> GenerateParams -> engine/batcher -> response.

Thin on purpose: validation lives in service.params, numerics in service.engine, scheduling in
service.batcher. Every handler maps domain errors to gRPC status codes, so no exception reaches
grpc (which would turn it into UNKNOWN) and none can stop the server:

  InvalidArgument  -> INVALID_ARGUMENT   (the message starts with the field's name; "request" for bytes
                      that don't parse as the request message)
  QueueFull        -> RESOURCE_EXHAUSTED (back off and retry)
  DeadlineExceeded -> DEADLINE_EXCEEDED (it expired while queued; usually grpc has cancelled it first)
  GenerationError  -> FAILED_PRECONDITION (a valid request this model can't satisfy, e.g. only_new
                      found too few new names within its draw budget; retrying won't help)
  anything else    -> INTERNAL (traceback to the server's stderr)
"""
import asyncio
import contextlib
import json
import sys
import time
import traceback

import grpc
from grpc._cython import cygrpc  # ExecuteBatchError: what a write to a call that has ended raises
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from service import gen_proto
from service.admission import QueueFull
from service.engine import GenerationError
from service.params import MAX_LENGTH_LIMIT, GenerateParams, InvalidArgument
from service.samples import Samples
from service.scheduling import DeadlineExceeded

gen_proto.ensure()
from service.namegen_pb import namegen_pb2 as pb  # noqa: E402
from service.namegen_pb import namegen_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_CHUNK = 10_000  # GenerateStream names per message unless the request says otherwise
MAX_CHUNK = 50_000  # a chunk of 64-character names then stays under the 4 MiB a default gRPC client accepts
UNARY_CHUNK = 4096  # a larger Generate is drawn in chunks of this many, pipelined with building the reply
DEADLINE_SLACK = 0.02  # seconds: a cancellation this close to the RPC's deadline is the deadline (cancelled_code)
PARAM_FIELDS = frozenset(GenerateParams.__dataclass_fields__)


def status_of(exc):
    """(grpc.StatusCode, message) for an exception raised while serving a request."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, GenerationError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    print("internal error while serving a request:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class Undecodable:
    """Request bytes that aren't the message (a broken or mismatched client). Parsed by grpc, they would
    fail before any handler runs, as UNKNOWN; this way the handler answers INVALID_ARGUMENT."""

    def __init__(self, cls, error):
        self.message = f"not a valid {cls.DESCRIPTOR.full_name} ({error})"


def _lenient(cls):
    def parse(data):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(cls, e)

    return parse


def add_to_server(servicer, server):
    """pb_grpc.add_NameGeneratorServicer_to_server, with request parsing that hands bad bytes to the handler."""
    methods = {
        "Generate": (grpc.unary_unary_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
        "GenerateStream": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
        "Score": (grpc.unary_unary_rpc_method_handler, pb.ScoreRequest, pb.ScoreResponse),
        "GetModelInfo": (grpc.unary_unary_rpc_method_handler, pb.GetModelInfoRequest, pb.ModelInfo),
    }
    handlers = {name: make(getattr(servicer, name), request_deserializer=_lenient(req),
                           response_serializer=resp.SerializeToString)
                for name, (make, req, resp) in methods.items()}
    service = pb.DESCRIPTOR.services_by_name["NameGenerator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def cancelled_code(context):
    """The status the client saw when its RPC stopped early, for the metrics: DEADLINE_EXCEEDED or CANCELLED.

    Both reach the server as a cancellation (HTTP/2 has one code for them); they differ in timing. At its
    deadline the client cancels, and the server's copy of the deadline (the request's timeout from when it
    arrived) expires about as the cancellation lands: time_remaining() is then 0, or a little more (up to
    7 ms measured over loopback)."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left < DEADLINE_SLACK else "CANCELLED"


def _parsed(request):
    if isinstance(request, Undecodable):
        raise InvalidArgument("request", request.message)
    return request


def params_of(request):
    """GenerateRequest -> (GenerateParams, chunk_size or None): unset fields keep their defaults."""
    fields = {d.name: v for d, v in _parsed(request).ListFields()}
    chunk = fields.pop("chunk_size", None)
    return GenerateParams(**{k: v for k, v in fields.items() if k in PARAM_FIELDS}), chunk


def add_samples(resp, samples):
    add = resp.samples.add  # the fastest way to build many submessages with upb (~1.3 us each)
    for name, logprob, known in samples.rows():
        add(name=name, logprob=logprob, in_training_data=known)
    return resp


def response_of(samples, seed):
    return add_samples(pb.GenerateResponse(seed=seed), samples)


def _struct(d):
    s = struct_pb2.Struct()
    s.update(json.loads(json.dumps(d or {}, default=str)))  # Struct wants plain JSON values
    return s


class NameGeneratorServicer(pb_grpc.NameGeneratorServicer):
    def __init__(self, engine, batcher, metrics=None, max_samples=100_000, max_stream_samples=10_000_000,
                 max_streams=16, stream_stall_s=30.0):
        self.engine = engine
        self.batcher = batcher
        self.metrics = metrics
        self.max_samples = max_samples
        self.max_stream_samples = max_stream_samples
        self.max_streams = max_streams
        self.stream_stall_s = stream_stall_s or None  # 0: a stream waits for its client as long as it takes
        self.streams = 0  # GenerateStreams being served
        self.stalled = 0  # streams ended for a stalled client that gRPC still holds (one message each)
        info = engine.info
        self._info = pb.ModelInfo(
            vocab=info.vocab,
            block_size=info.block_size,
            config=_struct(info.config),
            metrics=_struct(info.metrics),
            checkpoint_sha256=info.checkpoint_sha256,
            provider=info.provider,
            num_params=info.num_params,
            max_samples=max_samples,
            max_stream_samples=max_stream_samples,
            max_length_limit=MAX_LENGTH_LIMIT,
        )

    def _done(self, method, code, t0, names=0):
        self.batcher.busy_poll.touch()
        m = self.metrics
        if m is not None:
            m.observe_rpc(method, code, time.perf_counter() - t0)
            if names:
                m.names.inc(names)

    async def Generate(self, request, context):
        t0, code = time.perf_counter(), "OK"
        try:
            params, _ = params_of(request)
            req = self.engine.request(params, self.max_samples)
            if req.remaining <= UNARY_CHUNK:  # the common case, kept short
                resp = response_of(await self.batcher.submit(req, req.remaining, context.time_remaining()),
                                   req.params.seed)
            else:  # build the message from chunk k while the engine draws chunk k+1; it holds every name
                resp = pb.GenerateResponse(seed=req.params.seed)
                with self.batcher.reserve(req.remaining):
                    async with contextlib.aclosing(self._chunks(req, UNARY_CHUNK, context, reserved=True)) as chunks:
                        async for out in chunks:
                            add_samples(resp, out)
            self._done("Generate", code, t0, len(resp.samples))
            return resp
        except asyncio.CancelledError:  # client cancelled or its deadline passed: nobody to answer
            self._done("Generate", cancelled_code(context), t0)
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            status, msg = status_of(e)
            self._done("Generate", status.name, t0)
            await context.abort(status, msg)

    async def GenerateStream(self, request, context):
        t0, code, sent, counted = time.perf_counter(), "OK", 0, False
        try:
            params, chunk = params_of(request)
            chunk = DEFAULT_CHUNK if chunk is None else chunk
            if not 1 <= chunk <= MAX_CHUNK:
                raise InvalidArgument("chunk_size", f"must be in [1, {MAX_CHUNK}], got {chunk}")
            req = self.engine.request(params, self.max_stream_samples)
            seed = req.params.seed
            # A stream whose client reads slowly (or never) holds its chunks: the count bounds that memory.
            if self.streams >= self.max_streams:
                raise QueueFull(f"{self.max_streams} streams are being served already; retry later")
            self.streams += 1
            counted = True
            async with contextlib.aclosing(self._chunks(req, chunk, context)) as chunks:
                async for out in chunks:  # aclosing: a cancelled stream stops drawing at once, not at GC
                    if not await self._write(context, response_of(out, seed)):
                        code = "DEADLINE_EXCEEDED"  # the client stalled: _write ended the stream
                        return
                    sent += len(out)  # counted once gRPC took it: a chunk the client left before isn't
        except asyncio.CancelledError:  # the client went away mid-stream
            code = cancelled_code(context)
            raise
        except Exception as e:  # noqa: BLE001
            status, msg = status_of(e)
            code = status.name
            await context.abort(status, msg)
        finally:
            self.streams -= counted
            self._done("GenerateStream", code, t0, sent)

    async def _write(self, context, msg):
        """Send one stream message. -> False when the client took none for --stream-stall-s: the stream is
        then ended with DEADLINE_EXCEEDED, which frees its --max-streams slot and its chunks at once.

        Ending it is the handler returning with a status set: neither an abort nor a cancelled handler
        frees anything (grpc.aio has no server-side cancel, and an abort waits, like the write, until the
        client reads on). gRPC keeps the message that was being sent until the client reads on or leaves,
        so at most max_streams streams are left to it so at once: one stalling beyond that keeps waiting,
        and its slot, until one of them is let go (looked at again every stream_stall_s).

        The watch is a timer that cancels this task, as asyncio.timeout does, but re-armed while gRPC
        holds its share. A write run as a task of its own, to be waited for in slices, cost two loop passes
        more per message: a stream of 1-name chunks ran at 2,354 messages/s against 3,521 for the async
        generator before, where this way runs at 3,690-3,720 against 3,895-3,915 (-5%, as context.write alone)."""
        loop, task, stalled = asyncio.get_running_loop(), asyncio.current_task(), False

        def watch():
            nonlocal timer, stalled
            if self.stalled < self.max_streams:
                stalled = True
                task.cancel()
            else:
                timer = loop.call_later(self.stream_stall_s, watch)

        timer = self.stream_stall_s and loop.call_later(self.stream_stall_s, watch)
        try:
            await context.write(msg)
            return True
        except asyncio.CancelledError:
            if not stalled:  # the client went away
                raise
            task.uncancel()
        except cygrpc.ExecuteBatchError:  # the call ended (the client left, its deadline passed) before grpc
            raise asyncio.CancelledError from None  # cancelled this task: end the stream as it would have
        finally:
            if timer:
                timer.cancel()
        self.stalled += 1
        context.add_done_callback(self._let_go)
        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
        context.set_details(f"the client took no message for {self.stream_stall_s:g} s (--stream-stall-s): "
                            "the stream was ended to free its slot")
        return False

    def _let_go(self, context):
        """gRPC is done with a stream ended for a stalled client (the client read on or left)."""
        self.stalled -= 1

    async def _chunks(self, req, chunk, context, reserved=False):
        """The request's names in Samples of `chunk`, drawing one chunk ahead.

        The engine draws chunk k+1 while chunk k is serialised and sent; chunk k+2 is only asked
        for once grpc took chunk k (its flow control waits for the client), so a stream holds
        about two chunks however long it is. Chunks are drawn one after another from the same
        Request, so the names come in the same order as from Generate with the same seed.
        reserved: the request holds a Batcher.reserve; else its first chunk may be turned away.
        """
        admitted = False

        def fetch():
            nonlocal admitted
            if req.done:
                return None
            rows = min(chunk, req.remaining)
            task = asyncio.ensure_future(self.batcher.submit(req, rows, context.time_remaining(), admitted, reserved))
            admitted = True  # only the first chunk can be turned away (RESOURCE_EXHAUSTED)
            return task

        carry = Samples()  # only_new may hand back a few names more than asked for; they lead the next chunk
        pending = fetch()
        try:
            while pending is not None:
                carry.extend(await pending)
                pending = fetch()
                while len(carry) >= chunk or (pending is None and carry):
                    out, carry = carry[:chunk], carry[chunk:]
                    yield out
        finally:
            if pending is not None:  # cancelled or failed: stop drawing for it
                pending.cancel()
                if pending.done() and not pending.cancelled():
                    pending.exception()  # retrieved: its error (if any) was superseded by what ended the stream

    async def Score(self, request, context):
        t0 = time.perf_counter()
        try:
            count = len(_parsed(request).names)  # before a Python string is made for each
            if count > self.max_samples:
                raise InvalidArgument("names", f"at most {self.max_samples} names per request, got {count}")
            names = list(request.names)
            rows = self.engine.check_score_names(names)
            with self.batcher.slot(rows):
                scores = await self.batcher.score(names, rows)
                resp = pb.ScoreResponse()
                add = resp.scores.add
                for i, (name, (total, per)) in enumerate(zip(names, scores)):
                    add(name=name, logprob=total, char_logprobs=per)
                    if i % 8192 == 8191:
                        await asyncio.sleep(0)  # a big reply takes ~0.1 s to build: let other RPCs in meanwhile
            self._done("Score", "OK", t0)
            return resp
        except asyncio.CancelledError:
            self._done("Score", cancelled_code(context), t0)
            raise
        except Exception as e:  # noqa: BLE001
            status, msg = status_of(e)
            self._done("Score", status.name, t0)
            await context.abort(status, msg)

    async def GetModelInfo(self, request, context):
        t0 = time.perf_counter()
        try:
            _parsed(request)
        except InvalidArgument as e:
            self._done("GetModelInfo", "INVALID_ARGUMENT", t0)
            await context.abort(*status_of(e))
        self._done("GetModelInfo", "OK", t0)
        return self._info
