from shepherd.workers.load_monitor import RankLoad, rank_loads


def test_an_http_workers_get_load_gives_its_rank_or_all_ranks():
    answer = [
        {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 900},
        {"dp_rank": 1, "num_reqs": 5, "num_waiting_reqs": 0, "num_tokens": 100},
    ]
    # `num_reqs` counts the waiting requests too; token usage needs the KV size the worker reported.
    assert rank_loads(answer, None, kv_tokens=1000) == (RankLoad(0, 2, 1, 0.9), RankLoad(1, 5, 0, 0.1))
    assert rank_loads(answer, 1) == (RankLoad(1, 5, 0, None),)
    assert rank_loads(answer, 2) is None  # a rank the engine did not report


def test_a_grpc_workers_get_loads_gives_every_figure_with_zeros_left_out():
    # As MessageToDict renders it: proto3 leaves zero fields out, and 64-bit integers are strings.
    answer = {
        "loads": [
            {"dp_rank": 0, "num_running_reqs": 3, "num_waiting_reqs": 1, "token_usage": 0.5, "cache_hit_rate": 0.25},
            {"dp_rank": 1, "gen_throughput": 120.5},
            {"dp_rank": 2, "num_running_reqs": "7"},
        ]
    }
    assert rank_loads(answer, None) == (
        RankLoad(0, 3, 1, 0.5, 0.0, 0.25),
        RankLoad(1, 0, 0, 0.0, 120.5, 0.0),
        RankLoad(2, 7, 0, 0.0, 0.0, 0.0),
    )
    assert rank_loads(answer, 1) == (RankLoad(1, 0, 0, 0.0, 120.5, 0.0),)


def test_an_answer_that_does_not_say_gives_nothing():
    for answer in (
        None,
        {},
        {"loads": "busy"},
        "ok",
        [],
        [{"num_reqs": "many"}],
        [{"num_reqs": -1}],
        [{"num_reqs": True}],
        {"loads": [{"num_running_reqs": 1.5}]},
        {"loads": [{"token_usage": "high"}]},
    ):
        assert rank_loads(answer, None) is None, answer
