"""Latency, completions and metrics through the OpenAI-compatible API of the stand-in server."""

from __future__ import annotations

import http.client
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evo_compress.fitness.vllm.client import (
    ClientError,
    LatencyReport,
    complete,
    kv_cache_figures,
    measure_latency,
    parse_metrics,
    scrape_metrics,
    server_tpot_ms,
    stream_completion,
)
from evo_compress.fitness.vllm.server import ServerSpec, VLLMServer, free_port

STANDIN = (sys.executable, "-m", "evo_compress_doubles.vllm_server")
NAME = "evo-compress"
TTFT_MS = 30.0
TOKEN_MS = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    args = (
        *("--fake-ttft-ms", str(TTFT_MS), "--fake-token-delay-ms", str(TOKEN_MS)),
        *("--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.8"),
        *("--max-num-seqs", "16", "--enforce-eager"),
    )
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VLLMServer(ServerSpec(STANDIN, "echo-model", args), log, health_interval_s=0.05) as s:
        yield s


def post(base_url: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        connection.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_streamed_completion_is_timed(server: VLLMServer) -> None:
    timing = stream_completion(server.base_url, NAME, "hello world", max_tokens=12)
    assert timing.output_tokens == 12
    assert timing.ttft_s >= TTFT_MS / 1000
    assert timing.tpot_s is not None
    assert TOKEN_MS / 1000 * 0.9 <= timing.tpot_s <= TOKEN_MS / 1000 * 3
    assert timing.total_s >= timing.ttft_s + 11 * timing.tpot_s * 0.99


def test_without_ignore_eos_the_server_s_token_count_is_used(server: VLLMServer) -> None:
    # The stand-in ends at its EOS, a token without text: only the usage figure counts it.
    timing = stream_completion(server.base_url, NAME, "hi", max_tokens=50, ignore_eos=False)
    text = complete(server.base_url, NAME, "hi", max_tokens=50)
    assert timing.output_tokens == len(text.split()) + 1 < 50


def test_latency_report_respects_concurrency(server: VLLMServer) -> None:
    prompts = [f"prompt number {i}" for i in range(8)]
    before = scrape_metrics(server.base_url)["vllm:generation_tokens_total"]
    serial = measure_latency(server.base_url, NAME, prompts, 16, concurrency=1, warmup=2)
    after = scrape_metrics(server.base_url)["vllm:generation_tokens_total"]
    parallel = measure_latency(server.base_url, NAME, prompts, 16, concurrency=4, warmup=0)
    assert after - before == (2 + 8) * 16  # the warm-up requests were sent, not counted
    one_request_s = (TTFT_MS + 15 * TOKEN_MS) / 1000
    for report in (serial, parallel):
        assert isinstance(report, LatencyReport)
        assert report.requests == 8 and report.output_tokens == 8 * 16
        assert report.ttft_median_ms >= TTFT_MS and report.ttft_p95_ms >= report.ttft_median_ms
        assert TOKEN_MS * 0.9 <= report.tpot_median_ms <= TOKEN_MS * 3
        assert report.tpot_p95_ms >= report.tpot_median_ms
        assert report.throughput_tok_s == pytest.approx(report.output_tokens / report.wall_s)
        assert set(report.to_json()) == set(LatencyReport.__dataclass_fields__)
    assert serial.concurrency == 1 and parallel.concurrency == 4
    assert serial.wall_s >= 8 * one_request_s
    # Four in flight: about a quarter of the serial time, and never fewer than two rounds.
    assert 2 * one_request_s <= parallel.wall_s < 0.6 * serial.wall_s
    assert parallel.throughput_tok_s > 1.5 * serial.throughput_tok_s


def test_streams_delivered_in_a_burst_are_not_taken_as_generation_time(
    tmp_path: Path, server: VLLMServer
) -> None:
    # As the real CPU build did under load: chunks held back, then sent together. Their
    # chunk times say ~0 ms per token; the server's own histogram still times generation.
    paced = stream_completion(server.base_url, NAME, "hello", max_tokens=8)
    assert paced.paced
    args = ("--fake-ttft-ms", "5", "--fake-token-delay-ms", str(TOKEN_MS), "--fake-burst-stream")
    spec = ServerSpec(STANDIN, "echo-model", args)
    with VLLMServer(spec, tmp_path / "vllm.log", health_interval_s=0.05) as burst:
        held = stream_completion(burst.base_url, NAME, "hello", max_tokens=8)
        assert not held.paced and held.tpot_s is not None and held.tpot_s < TOKEN_MS / 1000 / 5
        before = scrape_metrics(burst.base_url)
        report = measure_latency(burst.base_url, NAME, ["a b", "c d"], 8, concurrency=2, warmup=0)
        after = scrape_metrics(burst.base_url)
    assert report.paced_requests == 0 and not report.paced
    assert math.isnan(report.tpot_median_ms) and report.to_json()["tpot_median_ms"] is None
    ms, name = server_tpot_ms(before, after) or (0.0, "")
    assert name == "vllm:time_per_output_token_seconds"
    assert TOKEN_MS * 0.9 <= ms <= TOKEN_MS * 3


def test_the_server_s_own_time_per_output_token_is_a_difference_of_scrapes() -> None:
    def scrape(total: float, count: float, old_total: float = 0.0) -> dict[str, object]:
        return parse_metrics(
            f'vllm:request_time_per_output_token_seconds_sum{{engine="0"}} {total}\n'
            f'vllm:request_time_per_output_token_seconds_count{{engine="0"}} {count}\n'
            f'vllm:time_per_output_token_seconds_sum{{engine="0"}} {old_total}\n'
            f'vllm:time_per_output_token_seconds_count{{engine="0"}} {count}\n'
        )

    # V1's per-request histogram first; only the requests between the two scrapes count.
    assert server_tpot_ms(scrape(0.5, 10), scrape(0.9, 20, 99.0)) == pytest.approx(
        (40.0, "vllm:request_time_per_output_token_seconds")
    )
    assert server_tpot_ms(scrape(0.5, 10), scrape(0.5, 10)) is None  # nothing served
    assert server_tpot_ms({}, {}) is None  # a server without the histograms


def test_measure_latency_checks_its_arguments(server: VLLMServer) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        measure_latency(server.base_url, NAME, ["a"], 1, concurrency=1)
    with pytest.raises(ValueError, match="prompts"):
        measure_latency(server.base_url, NAME, [], 8, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        measure_latency(server.base_url, NAME, ["a"], 8, concurrency=0)


def test_complete_returns_the_text(server: VLLMServer) -> None:
    assert complete(server.base_url, NAME, "count", max_tokens=5).split() == [
        f"tok{i}" for i in range(5)
    ]


def test_metrics_are_parsed_with_the_cache_config(server: VLLMServer) -> None:
    complete(server.base_url, NAME, "one two three", max_tokens=3)
    metrics = scrape_metrics(server.base_url)
    info = metrics["vllm:cache_config_info"]
    assert info["cache_dtype"] == "fp8" and info["gpu_memory_utilization"] == "0.8"
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) > 0
    for name in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert isinstance(metrics[name], float), name
    assert metrics["vllm:prompt_tokens_total"] >= 3
    assert metrics["vllm:num_requests_running"] == 0
    buckets = metrics["vllm:time_to_first_token_seconds_bucket"]
    assert buckets["+Inf"] == metrics["vllm:time_to_first_token_seconds_count"] >= 1


def test_kv_cache_figures_are_named(server: VLLMServer) -> None:
    figures = kv_cache_figures(scrape_metrics(server.base_url))
    # --kv-cache-dtype fp8 --gpu-memory-utilization 0.8: the stand-in sizes its cache as vLLM
    # would report it, in blocks of the default 16 tokens.
    assert figures["cache_dtype"] == "fp8" and figures["gpu_memory_utilization"] == 0.8
    assert figures["block_size"] == 16 and figures["num_gpu_blocks"] > 0
    assert figures["capacity_tokens"] == 16 * figures["num_gpu_blocks"]
    assert figures["usage"] == 0.0 and figures["sliding_window"] is None


def test_kv_cache_figures_of_other_vllm_releases() -> None:
    # Older releases: gpu_cache_usage_perc, and num_gpu_blocks "None" before profiling.
    old = parse_metrics(
        'vllm:cache_config_info{block_size="32",cache_dtype="fp8_e5m2",'
        'num_gpu_blocks="None",gpu_memory_utilization="0.85"} 1.0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n'
    )
    figures = kv_cache_figures(old)
    assert figures["usage"] == 0.25 and figures["block_size"] == 32
    assert figures["num_gpu_blocks"] is None and figures["capacity_tokens"] is None
    assert kv_cache_figures({})["usage"] is None  # a server without them


def test_parse_metrics_reads_the_text_format() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests running.",
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
            'vllm:request_success_total{finished_reason="length"} 5 1712345678000',
            'vllm:request_success_total{finished_reason="stop"} 1',
            "vllm:request_success_created 1.7e9",
            'vllm:cache_config_info{block_size="16",note="a \\"quoted\\", b} c"} 1.0',
            'vllm:ttft_seconds_bucket{le="0.1"} 2',
            'vllm:ttft_seconds_bucket{le="+Inf"} 3',
            "vllm:kv_cache_usage_perc NaN",
            "process_resident_memory_bytes 1.5e+09",
            "this line is not a metric",
            'broken{label="unterminated} 1',
        ]
    )
    metrics = parse_metrics(text)
    assert metrics["vllm:num_requests_running"] == 5.0
    assert metrics["vllm:request_success_total"] == 6.0
    assert "vllm:request_success_created" not in metrics
    assert metrics["vllm:cache_config_info"] == {"block_size": "16", "note": 'a "quoted", b} c'}
    assert metrics["vllm:ttft_seconds_bucket"] == {"0.1": 2.0, "+Inf": 3.0}
    assert math.isnan(metrics["vllm:kv_cache_usage_perc"])
    assert metrics["process_resident_memory_bytes"] == 1.5e9
    assert "this" not in metrics and "broken" not in metrics


def test_a_line_that_does_not_parse_leaves_the_others() -> None:
    # prometheus_client's parser gives up on a whole text at its first bad line; the lines
    # after it, and those before, must still be read.
    text = "\n".join(
        [
            "this line is not a metric",
            'broken{label="unterminated} 1',
            "# TYPE vllm:num_preemptions weird",
            "vllm:num_preemptions 2",
            'vllm:time_seconds_bucket{le="1.0"} 4',
            "also not a metric",
            "vllm:time_seconds_sum 3.5",
            # A counter without `_total` keeps its name (the parser would add the suffix).
            "# TYPE vllm:requests counter",
            "vllm:requests 7",
        ]
    )
    assert parse_metrics(text) == {
        "vllm:num_preemptions": 2.0,
        "vllm:time_seconds_bucket": {"1.0": 4.0},
        "vllm:time_seconds_sum": 3.5,
        "vllm:requests": 7.0,
    }


def test_an_unknown_model_is_a_client_error(server: VLLMServer) -> None:
    with pytest.raises(ClientError) as info:
        stream_completion(server.base_url, "no-such-model", "hi", max_tokens=4)
    message = str(info.value)
    assert f"POST {server.base_url}/v1/completions" in message
    assert "HTTP 404" in message and "does not exist" in message
    with pytest.raises(ClientError, match="HTTP 404"):
        complete(server.base_url, "no-such-model", "hi", max_tokens=4)


def test_timeouts_and_refused_connections_are_client_errors(server: VLLMServer) -> None:
    with pytest.raises(ClientError, match=r"within 0.1s"):
        stream_completion(server.base_url, NAME, "slow", max_tokens=100, timeout_s=0.1)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientError, match=f"GET {nobody}/metrics: ConnectionRefusedError"):
        scrape_metrics(nobody)


def test_the_stand_in_speaks_the_completions_protocol(server: VLLMServer) -> None:
    status, body = post(server.base_url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server.base_url, {"model": NAME, "prompt": "x", "max_tokens": 0})
    assert status == 400 and body["error"]["code"] == 400
    status, body = post(
        server.base_url,
        {"model": NAME, "prompt": ["a b", "c"], "max_tokens": 6, "stop": ["tok3"], "seed": 1},
    )
    assert status == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(
        c["text"] == " tok0 tok1 tok2 " and c["finish_reason"] == "stop" for c in body["choices"]
    )
    assert body["usage"]["completion_tokens"] == 2 * 4  # tok3 was generated, then cut
    assert body["usage"]["prompt_tokens"] == 3
    status, body = post(
        server.base_url,
        {"model": NAME, "prompt": "a b", "max_tokens": 2, "echo": True, "logprobs": 1},
    )
    choice = body["choices"][0]
    assert choice["text"] == "a b tok0 tok1" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == 2 + 2


@pytest.mark.slow
def test_a_real_model_streams_the_requested_tokens(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo_compress.testing import save_random_llama

    folder = save_random_llama(
        tmp_path / "tiny-llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    spec = ServerSpec(STANDIN, str(folder), env={"EVO_STANDIN_THREADS": "1"})
    prompt = "12+34="
    with VLLMServer(
        spec, tmp_path / "vllm.log", startup_timeout_s=180, health_interval_s=0.1
    ) as s:
        assert "stand-in backend: transformers" in s.log_path.read_text()
        timing = stream_completion(s.base_url, NAME, prompt, max_tokens=8)
        text = complete(s.base_url, NAME, prompt, max_tokens=8)
        status, body = post(
            s.base_url,
            {"model": NAME, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1},
        )
        metrics = scrape_metrics(s.base_url)
    assert timing.output_tokens == 8 and timing.tpot_s is not None and timing.ttft_s > 0
    # The same greedy continuation as transformers' own generate().
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    # Prompt logprobs, as lm-eval's loglikelihood requests read them.
    assert status == 200
    logprobs = body["choices"][0]["logprobs"]["token_logprobs"]
    assert body["usage"]["prompt_tokens"] == ids.shape[1]
    assert len(logprobs) == ids.shape[1] + 1 and logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in logprobs[1:])
    assert metrics["vllm:generation_tokens_total"] >= 8 + 1
