import orjson

from shepherd.cli import main


def test_bench_policy_reports_every_policy_and_fleet_size(tmp_path, capsys):
    out = tmp_path / "policy.json"
    argv = ["bench", "policy", "--workers", "4", "40", "--decisions", "60", "--warmup", "20", "--prompt-chars", "2000"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "µs per routing decision" in printed and "naive_scan" in printed
    results = orjson.loads(out.read_bytes())["results"]
    policies = ("cache_aware", "cache_aware_events", "cache_aware_http_events", "naive_scan", "round_robin")
    assert {(r["policy"], r["workers"]) for r in results} == {
        (policy, workers) for policy in policies for workers in (4, 40)
    }
    assert all(r["decisions"] == 60 and 0 < r["p50_us"] <= r["p99_us"] for r in results)
    cache_aware = [r for r in results if r["policy"] == "cache_aware"]
    assert all(r["index_probes_per_decision"] > 0 and r["indexed_chars"] > 0 for r in cache_aware)
    events = {(r["policy"], r["workers"]): r for r in results if r["policy"].endswith("_events")}
    assert all(r["prompt_tokens"] > 0 and r["engine_blocks"] > 0 for r in events.values())  # on the engines' reports
    # Over HTTP the cell tokenizes with the engines' BPE, which splits the words into more ids than the word tokenizer
    for workers in (4, 40):
        assert (
            events["cache_aware_http_events", workers]["prompt_tokens"]
            > events["cache_aware_events", workers]["prompt_tokens"]
        )
