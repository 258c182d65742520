from shepherd.workers.load_monitor import engine_requests


def test_an_http_workers_get_load_counts_its_rank_or_all_ranks():
    answer = [
        {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 900},
        {"dp_rank": 1, "num_reqs": 5, "num_waiting_reqs": 0, "num_tokens": 100},
    ]
    assert engine_requests(answer, None) == 8
    assert engine_requests(answer, 1) == 5
    assert engine_requests(answer, 2) is None  # a rank the engine did not report


def test_a_grpc_workers_get_loads_counts_running_and_waiting_requests():
    # As MessageToDict renders it: proto3 leaves zero fields out, and 64-bit integers are strings.
    answer = {"loads": [{"dp_rank": 0, "num_total_reqs": 4}, {"dp_rank": 1}, {"dp_rank": 2, "num_total_reqs": "7"}]}
    assert engine_requests(answer, None) == 11
    assert engine_requests(answer, 1) == 0


def test_an_answer_that_does_not_say_counts_nothing():
    for answer in (None, {}, {"loads": "busy"}, "ok", [{"num_reqs": "many"}], {"loads": [{"num_total_reqs": 1.5}]}):
        assert engine_requests(answer, None) is None
