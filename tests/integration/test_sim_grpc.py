"""`shepherd sim --grpc`: a simulated SGLang gRPC engine, driven over the published stubs by a grpc.aio client.

One sim process (two DP ranks, the batching latency model with short steps) serves the module; its HTTP sidecar
gives `/__ctl`, `/__log` and `/metrics`. A prefill/decode pair is started only for the PD test.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2
from tokenizers import Tokenizer

from shepherd.sim import bpe
from tests.support.polling import until
from tests.support.processes import SimFleet, http_request, start_sim

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
GENERATE_PATH = f"/{SERVICE}/Generate"
DEFAULT_LENGTH = 6
EOS, IM_END = 0, 2
PROMPT = list(range(10, 50))


def grpc_sim(tmp: Path, *args: str) -> SimFleet:
    """Start a `--grpc` sim; `grpc_url` is its gRPC address, `urls` its HTTP sidecar (what `ctl`/`log` use)."""
    tmp.mkdir(parents=True, exist_ok=True)
    sims = start_sim(tmp, 1, "--grpc", *args)
    ready = json.loads(next(tmp.glob("sim-*.json")).read_text())
    sims.grpc_url, sims.urls, sims.tokenizer_dir = ready["urls"][0], ready["http_urls"], ready["tokenizer_dir"]
    if not (sims.grpc_url.startswith("grpc://") and Path(sims.tokenizer_dir, "tokenizer.json").is_file()):
        sims.stop()
        raise AssertionError(f"unexpected ready file {ready}")
    return sims


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> SimFleet:
    args = ("--latency-model", "batch", "--decode-step-ms", "2", "--dp-size", "2")
    with grpc_sim(tmp_path_factory.mktemp("grpc-sim"), *args, "--max-new-tokens-default", str(DEFAULT_LENGTH)) as s:
        yield s


@pytest.fixture
def sim(fleet: SimFleet) -> SimFleet:
    fleet.reset()
    return fleet


@asynccontextmanager
async def channel(sim: SimFleet) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(sim.grpc_url.removeprefix("grpc://")) as ch:
        yield ch


def request(rid: str = "r1", stream: bool = False, prompt: list[int] = PROMPT, **sampling) -> pb.GenerateRequest:
    params = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, n=1)
    for name, value in sampling.items():
        if isinstance(value, list):
            getattr(params, name).extend(value)
        else:
            setattr(params, name, value)
    return pb.GenerateRequest(
        request_id=rid, tokenized=pb.TokenizedInput(input_ids=prompt), sampling_params=params, stream=stream
    )


async def generate(sim: SimFleet, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with channel(sim) as ch:
        return [r async for r in pb_grpc.SglangSchedulerStub(ch).Generate(req)]


async def rpc_error(sim: SimFleet, req: pb.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(sim, req)
    return caught.value


def grpc_entries(sim: SimFleet, path: str = GENERATE_PATH) -> list[dict]:
    return [e for e in sim.log(0)["requests"] if e["path"] == path]


async def test_stream_sends_one_chunk_per_step_and_the_complete_repeats_only_the_last(sim):
    responses = await generate(sim, request(stream=True))
    chunks, complete = [r.chunk for r in responses[:-1]], responses[-1].complete
    assert all(r.WhichOneof("response") == "chunk" for r in responses[:-1]) and responses[-1].HasField("complete")
    assert [len(c.token_ids) for c in chunks] == [1] * DEFAULT_LENGTH
    assert [c.completion_tokens for c in chunks] == list(range(1, DEFAULT_LENGTH + 1))
    assert {(c.prompt_tokens, r.request_id) for c, r in zip(chunks, responses, strict=False)} == {(len(PROMPT), "r1")}
    ids = [c.token_ids[0] for c in chunks]
    assert list(complete.output_ids) == ids[-1:]  # not the whole output again
    # max_new_tokens unset: the output ends naturally with EOS, counted and reported as the matched stop.
    assert ids[-1] == EOS and EOS not in ids[:-1]
    assert (complete.finish_reason, complete.matched_token_id) == ("stop", EOS)
    assert complete.completion_tokens == DEFAULT_LENGTH and complete.prompt_tokens == len(PROMPT)

    # The same prompt again, not streamed: one complete with every id, the same ids, the prompt now cached.
    (again,) = await generate(sim, request(rid="r2"))
    assert list(again.complete.output_ids) == ids and again.complete.cached_tokens == 32  # two 16-token pages
    log = sim.log(0)
    assert [e["body"]["request_id"] for e in grpc_entries(sim)] == ["r1", "r2"]
    assert grpc_entries(sim)[0]["body"]["tokenized"]["input_ids"] == PROMPT
    assert grpc_entries(sim)[0]["choices"] == [{"index": 0, "output_ids": ids, "finish_reason": "stop"}]
    assert log["num_requests"] == 2 and log["completion_tokens"] == 2 * DEFAULT_LENGTH and log["running"] == 0
    status, metrics = http_request("GET", sim.urls[0] + "/metrics")
    assert status == 200 and "sglang:num_requests_total" in metrics


async def test_max_new_tokens_gives_exactly_that_many_ids(sim):
    (five,) = await generate(sim, request(max_new_tokens=5))
    assert len(five.complete.output_ids) == 5 and EOS not in five.complete.output_ids
    assert five.complete.finish_reason == "length" and not five.complete.HasField("matched_token_id")
    (none,) = await generate(sim, request(max_new_tokens=0))
    assert list(none.complete.output_ids) == [] and none.complete.finish_reason == "length"


async def test_n2_gives_one_complete_per_choice(sim):
    responses = await generate(sim, request(n=2, max_new_tokens=4))
    completes = sorted((r.complete for r in responses), key=lambda c: c.index)
    assert [c.index for c in completes] == [0, 1] and completes[0].output_ids != completes[1].output_ids
    streamed = await generate(sim, request(rid="s", stream=True, n=2, max_new_tokens=4))
    for index, complete in enumerate(completes):
        mine = [r for r in streamed if (r.chunk.index if r.HasField("chunk") else r.complete.index) == index]
        assert [t for r in mine[:-1] for t in r.chunk.token_ids] == list(complete.output_ids)
        assert mine[-1].HasField("complete")
    choices = grpc_entries(sim)[0]["choices"]
    assert [c["output_ids"] for c in choices] == [list(c.output_ids) for c in completes]


async def test_stop_token_ids_end_the_output_at_the_first_match(sim):
    (plain,) = await generate(sim, request(max_new_tokens=8))
    ids = list(plain.complete.output_ids)
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    (stopped,) = await generate(sim, request(max_new_tokens=8, stop_token_ids=[ids[cut], 99999]))
    assert list(stopped.complete.output_ids) == ids[: cut + 1]
    assert (stopped.complete.finish_reason, stopped.complete.matched_token_id) == ("stop", ids[cut])
    (ignored,) = await generate(sim, request(max_new_tokens=8, stop_token_ids=[ids[cut]], ignore_eos=True))
    assert list(ignored.complete.output_ids) == ids


async def test_scripted_output_text_is_emitted_one_id_per_step(sim):
    tokenizer = Tokenizer.from_file(str(Path(sim.tokenizer_dir, "tokenizer.json")))
    text = "Hello 🙂 world"
    script = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(tokenizer.encode("🙂", add_special_tokens=False).ids) > 1  # the emoji spans byte tokens
    assert sim.ctl(0, output_text=text)["output_text"] == text
    responses = await generate(sim, request(stream=True))
    assert [list(r.chunk.token_ids) for r in responses[:-1]] == [[t] for t in [*script, EOS]]
    assert tokenizer.decode([*script, EOS]) == text  # EOS is special: skipped when decoding
    (capped,) = await generate(sim, request(max_new_tokens=2))
    assert list(capped.complete.output_ids) == script[:2] and capped.complete.finish_reason == "length"
    sim.ctl(0, output_text=f"done{bpe.IM_END}ignored")  # <|im_end|> is an EOS id too
    (ended,) = await generate(sim, request())
    assert ended.complete.output_ids[-1] == IM_END and ended.complete.matched_token_id == IM_END
    sim.ctl(0, output_text=None)
    (words,) = await generate(sim, request())
    assert len(words.complete.output_ids) == DEFAULT_LENGTH


async def test_abort_ends_the_stream_with_internal_and_unknown_ids_are_not_found(sim):
    async with channel(sim) as ch:
        stub = pb_grpc.SglangSchedulerStub(ch)
        for rid, target, n in (("abort-me", "abort-me", 1), ("pair", "pair-1", 2)):
            call = stub.Generate(request(rid=rid, stream=True, max_new_tokens=5000, n=n))
            first = await call.read()
            assert first.HasField("chunk")
            answer = await stub.Abort(pb.AbortRequest(request_id=target, reason="test"))
            assert answer.success, answer.message
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INTERNAL, "Request aborted")
        unknown = await stub.Abort(pb.AbortRequest(request_id="nobody"))
        assert not unknown.success and "not found" in unknown.message
        sim.ctl(0, hang=True)  # an abort also reaches a request that has not started yet
        hung = stub.Generate(request(rid="hung"))
        await until(lambda: len(grpc_entries(sim)) == 3, "the hung request to arrive")
        assert (await stub.Abort(pb.AbortRequest(request_id="hung"))).success
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hung.read()
        assert caught.value.code() == grpc.StatusCode.INTERNAL
    log = sim.log(0)
    assert [e["status"] for e in grpc_entries(sim)] == ["INTERNAL", "INTERNAL", "INTERNAL"]
    aborts = grpc_entries(sim, f"/{SERVICE}/Abort")
    assert [e["body"]["request_id"] for e in aborts] == ["abort-me", "pair-1", "nobody", "hung"]
    assert log["running"] == 0 and log["disconnects"] == 0


async def test_a_cancelled_call_aborts_its_engine_sequences(sim):
    async with channel(sim) as ch:
        call = pb_grpc.SglangSchedulerStub(ch).Generate(request(stream=True, max_new_tokens=5000))
        assert (await call.read()).HasField("chunk")
        assert sim.log(0)["running"] == 1
        call.cancel()
        await until(lambda: sim.log(0)["running"] == 0, "the engine to drop the cancelled request", timeout=5)
    (entry,) = grpc_entries(sim)
    assert entry["disconnected"] and entry["status"] == "CANCELLED" and sim.log(0)["disconnects"] == 1


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (404, grpc.StatusCode.NOT_FOUND),
        (408, grpc.StatusCode.DEADLINE_EXCEEDED),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, grpc.StatusCode.INTERNAL),
    ],
)
async def test_error_status_faults_map_to_sglang_grpc_codes(sim, status, code):
    sim.ctl(0, error_status=status)
    for stream in (False, True):
        assert (await rpc_error(sim, request(stream=stream))).code() == code
    assert sim.log(0)["num_requests"] == 0


async def test_invalid_requests_and_mid_stream_disconnects(sim):
    error = await rpc_error(sim, pb.GenerateRequest(request_id="x", stream=True))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Tokenized input must be provided")
    error = await rpc_error(sim, request(max_new_tokens=40000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in error.details()
    sim.ctl(0, disconnect_after_chunks=3)
    async with channel(sim) as ch:
        call = pb_grpc.SglangSchedulerStub(ch).Generate(request(stream=True, max_new_tokens=10))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in call:
                received.append(response)
    assert len(received) == 3 and caught.value.code() == grpc.StatusCode.INTERNAL
    await until(lambda: sim.log(0)["running"] == 0, "the cut request to be dropped", timeout=5)


async def test_get_tokenizer_streams_a_verified_zip_of_a_loadable_tokenizer_dir(sim, tmp_path):
    async with channel(sim) as ch:
        chunks = [c async for c in pb_grpc.SglangSchedulerStub(ch).GetTokenizer(common_pb2.GetTokenizerRequest())]
    data = b"".join(c.data for c in chunks)
    assert [c.sha256 for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "config.json"}
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.token_to_id(bpe.ENDOFTEXT) == EOS and tokenizer.token_to_id(bpe.IM_END) == IM_END
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [EOS, IM_END]
    assert "<|im_start|>" in json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    # Training is deterministic: this (test) process builds byte-identical tokenizer.json.
    bpe.build().write_dir(tmp_path / "local")
    assert (tmp_path / "local" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


async def test_model_server_info_loads_and_health(sim):
    async with channel(sim) as ch:
        stub = pb_grpc.SglangSchedulerStub(ch)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.model_path, info.served_model_name, info.tokenizer_path) == ("sim-model", "sim-model", "")
        assert list(info.eos_token_ids) == [EOS, IM_END] and info.is_generation and info.vocab_size > 1000
        assert info.max_context_length == 32768 and json.loads(info.default_sampling_params_json)["top_k"] == -1
        server = await stub.GetServerInfo(pb.GetServerInfoRequest())
        args = dict(server.server_args)
        assert args["served_model_name"] == "sim-model" and args["dp_size"] == 2 and args["tokenizer_path"] == ""
        assert server.server_type == "grpc" and server.max_total_num_tokens == args["max_total_tokens"] == 200_000
        pinned = request()
        pinned.data_parallel_rank = 1
        await generate(sim, pinned)
        loads = await stub.GetLoads(pb.GetLoadsRequest(include=["core"]))
        assert loads.dp_rank_count == 2 and [load.dp_rank for load in loads.loads] == [0, 1]
        assert loads.loads[1].max_running_requests == 64 and loads.aggregate.total_running_reqs == 0
        only = await stub.GetLoads(pb.GetLoadsRequest(dp_rank=1))
        assert [load.dp_rank for load in only.loads] == [1]
        assert sim.log(0)["rank_requests"] == [0, 1]
        assert (await stub.FlushCache(common_pb2.FlushCacheRequest())).success

        health = health_pb2_grpc.HealthStub(ch)
        assert (await stub.HealthCheck(pb.HealthCheckRequest())).healthy
        sim.ctl(0, health_status=503)
        answer = await stub.HealthCheck(pb.HealthCheckRequest())
        assert not answer.healthy and "503" in answer.message
        for service in ("", SERVICE):
            check = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="other"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()):
                pass
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_embed(sim):
    async with channel(sim) as ch:
        stub = pb_grpc.SglangSchedulerStub(ch)
        first = await stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=[5, 6, 7])))
        again = await stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=[5, 6, 7])))
        other = await stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=[5, 6, 8])))
        assert first.embedding_dim == len(first.embedding) == 16 and first.prompt_tokens == 3
        assert first.embedding == again.embedding != other.embedding
        assert abs(sum(v * v for v in first.embedding) - 1.0) < 1e-4
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refuse_stops_the_grpc_port_and_clearing_it_serves_again(sim):
    sim.ctl(0, refuse=True)
    assert (await rpc_error(sim, request())).code() == grpc.StatusCode.UNAVAILABLE
    sim.ctl(0, refuse=None)
    async with channel(sim) as ch:  # wait out the client's reconnect backoff after the refused connection
        call = pb_grpc.SglangSchedulerStub(ch).Generate(request(), wait_for_ready=True, timeout=5)
        (answer,) = [r async for r in call]
    assert answer.complete.finish_reason == "stop"


async def test_pd_decode_waits_for_its_prefill_room(tmp_path):
    with (
        grpc_sim(tmp_path / "prefill", "--role", "prefill", "--bootstrap-port", "0") as prefill,
        grpc_sim(tmp_path / "decode", "--role", "decode", "--bootstrap-timeout-secs", "5") as decode,
    ):
        req = request(max_new_tokens=4)
        port = prefill.bootstrap_ports[0]
        req.disaggregated_params.CopyFrom(
            pb.DisaggregatedParams(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=7)
        )
        async with channel(decode) as ch:
            waiting = pb_grpc.SglangSchedulerStub(ch).Generate(req)
            await until(lambda: len(grpc_entries(decode)) == 1, "the decode request to arrive")
            assert decode.log(0)["verified_rooms"] == 0
            (first,) = await generate(prefill, req)
            (answer,) = [r async for r in waiting]
        assert len(first.complete.output_ids) == 1 and first.complete.finish_reason == "length"
        assert list(answer.complete.output_ids)[:1] == list(first.complete.output_ids)
        assert len(answer.complete.output_ids) == 4
        assert prefill.log(0)["published_rooms"] == 1 and decode.log(0)["verified_rooms"] == 1


async def test_kv_events_give_subscribers_a_snapshot_then_each_rank_s_cache_changes(tmp_path):
    async def read(call: grpc.aio.UnaryStreamCall) -> common_pb2.KvEventBatch:
        return await asyncio.wait_for(call.read(), timeout=10)

    def stored_ids(batch: common_pb2.KvEventBatch) -> list[int]:
        return [t for e in batch.events if e.HasField("stored") for block in e.stored.blocks for t in block.token_ids]

    prompt = list(range(1000, 1000 + 3 * 16 + 5))  # three full 16-token pages and 5 more tokens
    with grpc_sim(tmp_path, "--kv-events", "--dp-size", "2") as sim:
        async with channel(sim) as ch:
            stub = pb_grpc.SglangSchedulerStub(ch)
            first = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
            empty = [await read(first) for _ in range(2)]  # each rank's snapshot: an empty cache, nothing published
            assert [(b.dp_rank, b.sequence_number, b.snapshot.count, b.snapshot.blocks) for b in empty] == [
                (0, 0, 1, 0),
                (1, 0, 1, 0),
            ]
            pinned = request(prompt=prompt, max_new_tokens=1)
            pinned.data_parallel_rank = 1
            await generate(sim, pinned)
            live = await read(first)
            assert (live.dp_rank, live.sequence_number, live.HasField("snapshot")) == (1, 1, False)
            assert [e.WhichOneof("data") for e in live.events] == ["stored"]
            (stored,) = live.events
            assert not stored.stored.HasField("parent_block_hash") and stored.event_id == 1
            assert [b.block_size for b in stored.stored.blocks] == [16, 16, 16]
            assert stored_ids(live) == prompt[:48]

            second = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
            rank0, rank1 = [await read(second) for _ in range(2)]
            assert (rank0.dp_rank, rank0.sequence_number, rank0.snapshot.blocks, stored_ids(rank0)) == (0, 0, 0, [])
            assert (rank1.dp_rank, rank1.sequence_number, rank1.snapshot.blocks) == (1, 1, 3)
            assert [e.WhichOneof("data") for e in rank1.events] == ["cleared", "stored"]
            assert stored_ids(rank1) == prompt[:48]
            assert [b.block_hash for b in rank1.events[1].stored.blocks] == [b.block_hash for b in stored.stored.blocks]

            assert http_request("POST", sim.urls[0] + "/flush_cache")[0] == 200  # a full flush on each rank
            for call in (first, second):
                flushed = sorted([await read(call) for _ in range(2)], key=lambda b: b.dp_rank)
                assert [(b.dp_rank, b.sequence_number) for b in flushed] == [(0, 1), (1, 2)]
                assert [[e.WhichOneof("data") for e in b.events] for b in flushed] == [["cleared"], ["cleared"]]
            first.cancel()
            second.cancel()

            def statuses() -> list[str | None]:
                return [e["status"] for e in grpc_entries(sim, f"/{SERVICE}/SubscribeKvEvents")]

            await until(lambda: statuses() == ["CANCELLED", "CANCELLED"], "the subscriptions to end")
