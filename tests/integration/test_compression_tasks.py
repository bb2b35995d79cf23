"""Compression jobs as Celery tasks through a real gpu-queue worker (CPU), on the real encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.errors import CompressionError
from tests.support.compression import COMPRESSION_REDIS_URL, client_app, gpu_worker, poll

pytestmark = pytest.mark.timeout(300)

SENTENCES = [
    "I am still waiting on my card?",
    "How do I top up using my bank transfer?",
    "Why was I charged a fee for a cash withdrawal?",
    "Can I change my PIN at an ATM?",
    "My payment was declined at the shop.",
]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    import redis

    try:
        redis.Redis.from_url(COMPRESSION_REDIS_URL, socket_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("Redis is not reachable for db 12")
    log = tmp_path_factory.mktemp("gpu-worker") / "worker.log"
    with gpu_worker(log) as process:
        yield process, log


@pytest.fixture(scope="module")
def app():
    client = client_app()
    yield client
    client.close()


def submit(app, method: str, model: str, config: dict, store: Path):
    return app.send_task(f"cohort.compress.{method}", args=[model, config, str(store)], queue="gpu")


def wait_states(result, *, timeout: float) -> list[str]:
    """Poll a task until it ends; return every state seen (PROGRESS included)."""
    seen: list[str] = []

    def ended() -> bool:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return result.ready()

    poll(ended, timeout=timeout, interval=0.02, what=f"task {result.id}")
    return seen


def test_quantize_then_evaluate_the_real_encoder(worker, app, tmp_path: Path) -> None:
    from compression_jobs.configs import EvaluateConfig, QuantizeConfig
    from workers.encoder_loading import load_encoder, read_manifest, sha256_file

    store = tmp_path / "store"
    result = submit(app, "quantize", "all-MiniLM-L6-v2", QuantizeConfig(check_limit=16).to_json(), store)
    states = wait_states(result, timeout=240)
    assert result.state == "SUCCESS", (states, result.result)
    assert "PROGRESS" in states
    value = result.result
    artifact = Path(value["artifact"])
    assert artifact.parent == store and value["metrics"]["check"]["cosine_mean"] >= 0.99

    manifest = read_manifest(artifact)
    assert manifest["job"] == "quantize" and manifest["config"] == QuantizeConfig(check_limit=16).to_json()
    assert manifest["parent"]["path"] == "all-MiniLM-L6-v2" and manifest["recipe"]["kind"] == "dynamic_int8"
    assert manifest["files"], "the manifest lists the artifact's files"
    for rel, digest in manifest["files"].items():
        assert sha256_file(artifact / rel) == digest
    assert not [p for p in store.iterdir() if p.name.startswith(".")], "no temporary directory is left"

    fp32 = load_encoder("all-MiniLM-L6-v2").encode(SENTENCES, normalize_embeddings=True)
    int8 = load_encoder(str(artifact)).encode(SENTENCES, normalize_embeddings=True)
    assert ((fp32 * int8).sum(1) >= 0.99).all()
    # The grouper selects it by config: [grouping] encoder = "<artifact>".
    from ops.configfile import default_config
    from workers.encoder import Encoder
    from workers.settings import worker_settings

    config = default_config()
    config.setdefault("grouping", {})["encoder"] = str(artifact)
    settings = worker_settings(config, {"COHORT_REDIS_URL": COMPRESSION_REDIS_URL})
    grouper_vectors = Encoder.for_grouping(settings.grouping).encode(SENTENCES)  # the artifact keeps its own recipe
    assert ((fp32 * grouper_vectors).sum(1) >= 0.99).all()

    evaluation = submit(app, "evaluate", str(artifact),
                        EvaluateConfig(limit=64, repeats=1, batch_size=32, stsb=False).to_json(), store)
    wait_states(evaluation, timeout=240)
    assert evaluation.state == "SUCCESS", evaluation.result
    report = evaluation.result["metrics"]
    assert report["model"]["recipe"] == "dynamic_int8" and report["reference"]["recipe"] == "float32"
    assert report["agreement"]["cosine_mean"] >= 0.99
    assert report["model"]["per_second"] > 0 and report["throughput_ratio"] > 0
    assert (Path(evaluation.result["artifact"]) / "report.json").is_file()


def test_a_missing_model_path_fails_with_a_clear_message(worker, app, tmp_path: Path) -> None:
    store = tmp_path / "store"
    missing = str(tmp_path / "no-such-model")
    result = submit(app, "prune", missing, {"method": "prune", "version": 1}, store)
    wait_states(result, timeout=60)
    assert result.state == "FAILURE"
    error = result.result
    assert isinstance(error, CompressionError)
    assert "does not exist" in str(error) and missing in str(error)
    assert not store.exists() or list(store.iterdir()) == []


def test_a_bad_config_fails_before_any_work(worker, app, tmp_path: Path) -> None:
    result = submit(app, "quantize", "all-MiniLM-L6-v2", {"method": "quantize", "version": 1, "kind": "int3"},
                    tmp_path / "store")
    wait_states(result, timeout=60)
    assert result.state == "FAILURE"
    assert "QuantizeConfig.kind" in str(result.result)


CLI_DRIVER = (
    "import argparse, sys; from ops import cli_compress; "
    "parser = argparse.ArgumentParser(prog='cohort'); sub = parser.add_subparsers(dest='command', required=True); "
    "cli_compress.register(sub); args = parser.parse_args(sys.argv[1:]); sys.exit(args.handler(args))"
)


def test_cli_submits_a_job_and_follows_it_to_the_end(worker, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    import torch

    from tests.support.compression import REPO_ROOT, tiny_mlp, worker_env

    torch.save(tiny_mlp([8, 16, 4]), tmp_path / "mlp.pt")
    (tmp_path / "prune.json").write_text(json.dumps(
        {"method": "prune", "version": 1, "kind": "global_l1_unstructured", "amount": 0.5}))
    command = [sys.executable, "-c", CLI_DRIVER, "compress", "prune", str(tmp_path / "mlp.pt"),
               "--config", str(tmp_path / "prune.json"), "--store", str(tmp_path / "store"), "--wait",
               "--timeout", "120"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert value["metrics"]["sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.01)
    assert Path(value["artifact"]).parent == tmp_path / "store"
    assert "success" in done.stderr

    bad = subprocess.run([*command[:6], "--config", str(tmp_path / "missing.json"), *command[8:]],
                         cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "cannot read config file" in bad.stderr


def test_a_cancelled_job_stops_and_leaves_no_artifact(worker, app, tmp_path: Path) -> None:
    from compression_jobs.configs import DistillConfig
    from ops.cli_compress import cancel
    from tests.support.compression import tiny_encoder_dir

    teacher = tiny_encoder_dir(tmp_path / "teacher", num_hidden_layers=2)
    (tmp_path / "s.txt").write_text("\n".join(f"how do I order card number {i}" for i in range(1500)))
    config = DistillConfig(num_layers=1, sources=(str(tmp_path / "s.txt"),), epochs=50, batch_size=8,
                           max_sentences=1000, device="cpu")
    store = tmp_path / "store"
    result = submit(app, "distill", str(teacher), config.to_json(), store)
    poll(lambda: result.state == "PROGRESS" and "training" in str((result.info or {}).get("stage")),
         timeout=120, interval=0.05, what="the training stage")
    cancel(app, result.id)
    wait_states(result, timeout=120)
    assert result.state == "FAILURE"
    assert "cancelled" in str(result.result)
    assert not store.exists() or list(store.iterdir()) == []
