"""The fleet page's engine figures: parsed from any engine's Prometheus text (SGLang, vLLM, llama.cpp names)."""

from shepherd.http.dashboard import parse_engine_sample


def test_cache_counters_of_every_engine_family_are_read():
    sglang = parse_engine_sample('sglang:prompt_tokens_total{model_name="m"} 100\nsglang:cached_tokens_total 40\n')
    llama = parse_engine_sample("llamacpp:prompt_tokens_total 200\nllamacpp:prompt_tokens_cached_total 150\n")
    vllm = parse_engine_sample('vllm:prompt_tokens_total{model_name="m"} 10\nvllm:prompt_tokens_cached_total 5\n')
    assert (sglang.prompt_tokens, sglang.cached_tokens) == (100, 40)
    assert (llama.prompt_tokens, llama.cached_tokens) == (200, 150)
    assert (vllm.prompt_tokens, vllm.cached_tokens) == (10, 5)


def test_ttft_buckets_sum_over_series():
    text = (
        'sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 3\n'
        'sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="b"} 2\n'
        'sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="a"} 4\n'
    )
    assert parse_engine_sample(text).ttft == {0.1: 5.0, float("inf"): 4.0}
