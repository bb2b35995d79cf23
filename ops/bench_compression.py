"""Benchmark of the compressed encoders against fp32 all-MiniLM-L6-v2, measured in one run.

    python -m ops.bench_compression [--threads 2] [--rounds 20] [--retrain]

Rows: fp32, int8 (the default ``QuantizeConfig`` recipe), the distilled student (3 of the 6
layers, spread out, with half the FFN width, trained to match fp32 embeddings on 16,000
unlabeled sentences), the student plus int8. Columns: sentences per second (median of rounds
interleaved in this process) and ratio to fp32 (median of per-round ratios), mean cosine to the fp32
embeddings, STS-B dev Spearman and its share of the teacher's, artifact size on disk, in-memory
weight size, parameters. Then how the grouper's batches (greedy clustering at 0.85, at most 16,
windows of 200 queries of a Banking77 stream) agree with fp32's, and a Banking77 intent
classifier distilled into a smaller one.

The artifacts are made by the compression jobs themselves (``run_job``) into a store under
``var/compression-bench`` and reused while their config is unchanged: the first run trains the
student (minutes), later runs only measure. The Banking77 stream is held out of the student's
training sentences; STS-B dev is never trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "var" / "compression-bench"
PACKAGED = "all-MiniLM-L6-v2"
FLOORS = {
    "int8": {"ratio": 1.5, "cosine": 0.99},
    "student": {"ratio": 2.0, "stsb_share": 0.95},
    "student+int8": {"ratio": 2.5, "stsb_share": 0.93},
}
"""The issue's floors, against fp32 in the same run."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per model (default 20)")
    parser.add_argument("--chunk", type=int, default=250, help="sentences per timed round (default 250)")
    parser.add_argument("--stream", type=int, default=3000, help="Banking77 queries held out as the stream")
    parser.add_argument("--window", type=int, default=200, help="queries clustered together (default 200)")
    parser.add_argument("--threshold", type=float, default=0.85, help="grouping cosine threshold (default 0.85)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="store and cache directory")
    parser.add_argument("--retrain", action="store_true", help="train the student again even if cached")
    parser.add_argument("--max-sentences", type=int, default=16000, help="student training sentences")
    parser.add_argument("--epochs", type=int, default=3, help="student training epochs")
    parser.add_argument("--ffn-fraction", type=float, default=0.5,
                        help="share of FFN channels the student keeps (default 0.5)")
    parser.add_argument("--skip-classifier", action="store_true", help="leave out the classifier example")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress_printer(label: str):
    last: dict[str, Any] = {"stage": None, "at": 0.0}

    def report(step: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if stage != last["stage"] or now - last["at"] > 15:
            log(f"{label}: {stage} {step}/{total}")
            last.update(stage=stage, at=now)

    return report


def find_artifact(store: Path, job: str, config: dict[str, Any], parent: str) -> str | None:
    """The newest artifact of the store made by ``job`` with ``config`` from ``parent``."""
    from compression_jobs.store import list_artifacts
    from workers.encoder_loading import read_manifest

    for path in reversed(list_artifacts(store)):
        manifest = read_manifest(path)
        if (manifest.get("job") == job and manifest.get("config") == config
                and manifest.get("parent", {}).get("path") in (parent, str(Path(parent).resolve()))):
            return str(path)
    return None


def produce(store: Path, job: str, config: Any, parent: str, *, force: bool = False) -> tuple[str, bool]:
    """An artifact of ``job`` with ``config`` from ``parent``: reused if present, else made now."""
    from compression_jobs.jobs import run_job

    if not force and (found := find_artifact(store, job, config.to_json(), parent)):
        return found, False
    started = time.perf_counter()
    result = run_job(job, parent, config.to_json(), str(store), progress=progress_printer(job))
    log(f"{job} artifact {result['name']} in {time.perf_counter() - started:.0f} s")
    return result["artifact"], True


def banking_split(stream_size: int, cache: Path) -> tuple[list[str], Path]:
    """A seeded shuffle of Banking77: the stream (held out) and a text file of the other rows."""
    import numpy as np

    from compression_jobs import data

    texts = [text for text, _ in data.read_banking77()]
    order = np.random.default_rng(0).permutation(len(texts))
    stream = [texts[i] for i in order[:stream_size]]
    rest = cache / "banking77-train-part.txt"
    lines = "\n".join(texts[i].replace("\n", " ") for i in sorted(order[stream_size:])) + "\n"
    if not rest.exists() or rest.read_text(encoding="utf-8") != lines:
        rest.write_text(lines, encoding="utf-8")
    return stream, rest


def throughput(models: dict[str, Any], texts: list[str], *, rounds: int, chunk: int) -> dict[str, dict[str, float]]:
    """Sentences per second of each model, and its speed ratio to the first model.

    Each round times every model on the same chunk of ``texts``, in a rotating order; the rate is
    the median over rounds and the ratio the median of the per-round ratios, so that load from
    other processes, which drifts over seconds, weighs on all models alike.
    """
    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for model in models.values():
        model.encode(texts[:128], batch_size=64, show_progress_bar=False)
    for r in range(rounds):
        start = (r * chunk) % max(1, len(texts) - chunk + 1)
        part = texts[start:start + chunk]
        for name in names[r % len(names):] + names[: r % len(names)]:
            began = time.perf_counter()
            models[name].encode(part, batch_size=64, show_progress_bar=False)
            rates[name].append(len(part) / (time.perf_counter() - began))
    base = names[0]
    return {name: {"per_s": statistics.median(rates[name]),
                   "ratio": statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))}
            for name in names}


def embed(model: Any, texts: list[str]) -> Any:
    import numpy as np

    vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def spearman(model: Any, pairs: Any) -> float:
    from scipy.stats import spearmanr

    a, b = embed(model, pairs.first), embed(model, pairs.second)
    return float(spearmanr((a * b).sum(1), pairs.scores).statistic)


def grouping(vectors: Any, *, window: int, threshold: float) -> list[list[int]]:
    """The grouper's clustering, window by window, as batches of stream indices."""
    from workers.clustering import cluster

    batches: list[list[int]] = []
    for start in range(0, len(vectors), window):
        part = vectors[start:start + window]
        batches.extend([start + i for i in batch] for batch in cluster(part, threshold=threshold, max_size=16))
    return batches


def grouping_agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
    """Share of the reference's same-batch pairs kept, and share of its batches found identical."""
    def pairs(batches: list[list[int]]) -> set[tuple[int, int]]:
        return {(a, b) for batch in batches for i, a in enumerate(batch) for b in batch[i + 1:]}

    ref_pairs, cand_pairs = pairs(reference), pairs(candidate)
    identical = {frozenset(b) for b in reference} & {frozenset(b) for b in candidate}
    return {
        "pairs_kept": len(ref_pairs & cand_pairs) / max(1, len(ref_pairs)),
        "pairs_added": len(cand_pairs - ref_pairs) / max(1, len(ref_pairs)),
        "batches_identical": len(identical) / max(1, len(reference)),
        "mean_batch": statistics.mean(len(b) for b in candidate),
    }


def matched_threshold(reference: list[list[int]], vectors: Any, *, window: int) -> dict[str, float]:
    """The threshold at which an encoder puts as many pairs together as the reference does,
    and its agreement there: what the grouper's threshold should be for that encoder."""
    def pair_count(batches: list[list[int]]) -> int:
        return sum(len(b) * (len(b) - 1) // 2 for b in batches)

    target = pair_count(reference)
    best: tuple[int, float, list[list[int]]] | None = None
    for step in range(0, 31):
        threshold = round(0.80 + 0.005 * step, 3)
        batches = grouping(vectors, window=window, threshold=threshold)
        gap = abs(pair_count(batches) - target)
        if best is None or gap < best[0]:
            best = (gap, threshold, batches)
    assert best is not None
    return {"threshold": best[1], **grouping_agreement(reference, best[2])}


def classifier_example(fp32: Any, cache: Path, store: Path) -> dict[str, Any]:
    """Banking77 intents: an MLP teacher on frozen fp32 embeddings, distilled into a smaller MLP."""
    import numpy as np
    import torch

    from compression_jobs import data
    from compression_jobs.configs import DistillConfig
    from compression_jobs.distill import mlp, split_rows

    rows = data.read_banking77()
    labels = sorted({label for _, label in rows})
    npz = cache / "banking77-minilm.npz"
    if not npz.exists():
        log("embedding Banking77 for the classifier example")
        x = embed(fp32, [text for text, _ in rows])
        y = np.asarray([labels.index(label) for _, label in rows], dtype=np.int64)
        np.savez(npz, x=x, y=y)
    arrays = np.load(npz)
    xs, ys = torch.as_tensor(arrays["x"]), torch.as_tensor(arrays["y"])
    train, _ = split_rows(len(xs), 0.2, 0)  # the same split as the distill job's holdout
    teacher_path = cache / "banking77-teacher.pt"
    if not teacher_path.exists():
        torch.manual_seed(0)
        teacher = mlp([xs.shape[1], 512, len(labels)])
        optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.01)
        idx = torch.as_tensor(train)
        for _ in range(40):
            for batch in idx[torch.randperm(len(idx))].split(128):
                loss = torch.nn.functional.cross_entropy(teacher(xs[batch]), ys[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        torch.save(teacher.eval(), teacher_path)
    results: dict[str, Any] = {}
    for name, alpha in (("distilled", 0.5), ("labels_only", 0.0)):
        config = DistillConfig(kind="classifier", data=str(npz), student_hidden=(32,), epochs=60, lr=3e-3,
                               batch_size=128, temperature=2.0, alpha=alpha, holdout_fraction=0.2)
        artifact, _ = produce(store, "distill", config, str(teacher_path))
        from workers.encoder_loading import read_manifest

        results[name] = read_manifest(artifact)["metrics"]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from compression_jobs import data
    from compression_jobs.configs import DistillConfig, QuantizeConfig
    from compression_jobs.evaluate import serialized_bytes
    from compression_jobs.models import model_size_bytes, parameter_count, resolve_path
    from workers.encoder_loading import cpu_has_vnni, load_encoder

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cache = args.cache.resolve()
    store = cache / "store"
    cache.mkdir(parents=True, exist_ok=True)
    stream, banking_rest = banking_split(args.stream, cache)

    quantize = QuantizeConfig()
    student_config = DistillConfig(
        kind="embedding", num_layers=3, layer_selection="uniform", ffn_fraction=args.ffn_fraction,
        sources=("paws_wiki", "stsb_train", "self_instruct", "arena_hard", str(banking_rest)),
        max_sentences=args.max_sentences, epochs=args.epochs, lr=2e-4, batch_size=64, max_seq_length=128)
    int8_path, _ = produce(store, "quantize", quantize, PACKAGED)
    student_path, _ = produce(store, "distill", student_config, PACKAGED, force=args.retrain)
    student_int8_path, _ = produce(store, "quantize", quantize, student_path, force=args.retrain)
    specs = {"fp32": PACKAGED, "int8": int8_path, "student": student_path, "student+int8": student_int8_path}
    models = {name: load_encoder(spec) for name, spec in specs.items()}

    log(f"timing {len(models)} encoders, {args.rounds} rounds of {args.chunk} sentences")
    speed = throughput(models, stream[:1000], rounds=args.rounds, chunk=args.chunk)
    log("embedding the stream and STS-B dev")
    vectors = {name: embed(model, stream) for name, model in models.items()}
    pairs = data.stsb_dev()
    stsb = {name: spearman(model, pairs) for name, model in models.items()}
    batches = {name: grouping(v, window=args.window, threshold=args.threshold) for name, v in vectors.items()}

    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        body: Any = model[0]
        body = body.model
        cosine = (vectors[name] * vectors["fp32"]).sum(1)
        path = resolve_path(specs[name])
        rows[name] = {
            "sentences_per_s": round(speed[name]["per_s"], 1),
            "ratio": round(speed[name]["ratio"], 3),
            "cosine_mean": round(float(cosine.mean()), 5),
            "cosine_min": round(float(cosine.min()), 5),
            "stsb_spearman": round(stsb[name], 5),
            "stsb_share": round(stsb[name] / stsb["fp32"], 5),
            "disk_mb": round(model_size_bytes(path) / 2**20, 1),
            "weights_mb": round(serialized_bytes(body) / 2**20, 1),
            "parameters": parameter_count(body),
            "grouping": {k: round(v, 4) for k, v in grouping_agreement(batches["fp32"], batches[name]).items()},
            "grouping_matched": {k: round(v, 4) for k, v in matched_threshold(
                batches["fp32"], vectors[name], window=args.window).items()},
            "path": str(specs[name]),
        }
    classifier = None if args.skip_classifier else classifier_example(models["fp32"], cache, store)

    print(f"\nCompressed encoders vs fp32 all-MiniLM-L6-v2 (same run, {args.threads} torch threads, "
          f"{os.cpu_count()} CPUs, VNNI {'yes' if cpu_has_vnni() else 'no'}, medians of {args.rounds} interleaved "
          f"rounds of {args.chunk} Banking77 queries, batch 64)\n")
    header = (f"{'encoder':<13} {'sent/s':>7} {'ratio':>6} {'cos mean':>8} {'cos min':>8} {'STS-B':>7} "
              f"{'% fp32':>7} {'disk MB':>8} {'wts MB':>7} {'params':>11}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(f"{name:<13} {r['sentences_per_s']:>7.0f} {r['ratio']:>5.2f}x {r['cosine_mean']:>8.4f} "
              f"{r['cosine_min']:>8.4f} {r['stsb_spearman']:>7.4f} {100 * r['stsb_share']:>6.1f}% "
              f"{r['disk_mb']:>8.1f} {r['weights_mb']:>7.1f} {r['parameters']:>11,}")
    print("\n(disk MB: the artifact as stored, float weights plus recipe; wts MB: the loaded weights, int8 where "
          "quantized)")
    print(f"\nGrouping vs fp32 on a {args.stream}-query Banking77 stream (windows of {args.window}, "
          f"threshold {args.threshold}, at most 16):")
    print(f"{'encoder':<13} {'pairs kept':>10} {'pairs added':>11} {'batches identical':>17} {'mean batch':>10}")
    for name, r in rows.items():
        g = r["grouping"]
        print(f"{name:<13} {100 * g['pairs_kept']:>9.1f}% {100 * g['pairs_added']:>10.1f}% "
              f"{100 * g['batches_identical']:>16.1f}% {g['mean_batch']:>10.3f}")
    print(f"\nThe same at the threshold that gives each encoder as many same-batch pairs as fp32 at "
          f"{args.threshold}:")
    print(f"{'encoder':<13} {'threshold':>9} {'pairs kept':>10} {'pairs added':>11} {'batches identical':>17}")
    for name, r in rows.items():
        g = r["grouping_matched"]
        print(f"{name:<13} {g['threshold']:>9.3f} {100 * g['pairs_kept']:>9.1f}% {100 * g['pairs_added']:>10.1f}% "
              f"{100 * g['batches_identical']:>16.1f}%")
    if classifier:
        print("\nBanking77 intent classifier on frozen fp32 MiniLM embeddings (held-out 20% of train.csv):")
        d, plain = classifier["distilled"], classifier["labels_only"]
        print(f"  teacher MLP 384-512-77 ({d['parameters_teacher']:,} params): accuracy {d['accuracy_teacher']:.4f}")
        print(f"  student MLP 384-32-77  ({d['parameters_student']:,} params), distilled (T=2, alpha=0.5): "
              f"accuracy {d['accuracy_student']:.4f}, agrees with the teacher on {d['agreement_with_teacher']:.4f}")
        print(f"  same student on hard labels only: accuracy {plain['accuracy_student']:.4f}, agrees with the "
              f"teacher on {plain['agreement_with_teacher']:.4f}")
    print("\nFloors:")
    verdicts = {}
    for name, floor in FLOORS.items():
        r = rows[name]
        ok = r["ratio"] >= floor["ratio"]
        checks = [f"ratio {r['ratio']:.2f}x >= {floor['ratio']}x: {'met' if ok else 'MISSED'}"]
        if "cosine" in floor:
            ok &= r["cosine_mean"] >= floor["cosine"]
            checks.append(f"cosine {r['cosine_mean']:.4f} >= {floor['cosine']}: "
                          f"{'met' if r['cosine_mean'] >= floor['cosine'] else 'MISSED'}")
        if "stsb_share" in floor:
            ok &= r["stsb_share"] >= floor["stsb_share"]
            checks.append(f"STS-B {100 * r['stsb_share']:.1f}% >= {100 * floor['stsb_share']:.0f}%: "
                          f"{'met' if r['stsb_share'] >= floor['stsb_share'] else 'MISSED'}")
        verdicts[name] = bool(ok)
        print(f"  {name:<13} " + "; ".join(checks))
    print(f"\nTotal {time.perf_counter() - started:.0f} s. Artifacts: {store}")
    figures = {"rows": rows, "classifier": classifier, "floors_met": verdicts, "threads": args.threads,
               "vnni": cpu_has_vnni(), "torch": torch.__version__, "seconds": round(time.perf_counter() - started)}
    out = args.json or cache / "results.json"
    out.write_text(json.dumps(figures, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
