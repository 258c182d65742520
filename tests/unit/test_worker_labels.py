from shepherd.workers.manager import discovered_labels, resolve_model_id


def test_server_info_becomes_labels_without_secrets():
    server_info = {
        "model_path": "org/llama", "tp_size": 2, "is_embedding": False, "max_total_num_tokens": 500000,
        "api_key": "sk-worker", "admin_api_key": "sk-admin", "hf_token": "hf_x", "ssl_keyfile": "/k.pem",
        "json_model_override_args": "x" * 1000,
    }  # fmt: skip
    labels = discovered_labels(server_info)
    assert labels == {
        "model_path": "org/llama",
        "tp_size": "2",
        "is_embedding": "false",
        "max_total_num_tokens": "500000",
    }
    assert "sk-" not in str(labels)


def test_model_id_resolution_order():
    assert resolve_model_id({"served_model_name": "a", "model_path": "org/b"}, {}) == "a"
    assert resolve_model_id({"model_path": "org/b"}, {"data": [{"id": "c"}]}) == "c"
    assert resolve_model_id({"model_path": "org/b/"}, {}) == "b"
    assert resolve_model_id({}, {}) == "unknown"
