"""The ``lol`` command line.

``lol inspect PATH [--json]`` reads a LoRA file or PEFT folder and reports on it; ``lol analyse PATH [--db DB]
[--json]`` adds the predictions and the nearest stored LoRAs (what the app's upload tab shows); ``lol zoo list`` and
``lol zoo build NAME --out DIR`` make zoos of real LoRAs; ``lol export [--db FILE] OUT`` backs up a collection;
``lol info [--json]`` shows the settings, the data found and the package versions; ``lol serve`` starts the app
(:func:`app.serve.main`, imported only then).

Bad input exits with status 2 and one line ``error: <what is wrong>`` on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lol_engine.errors import BadRequestError, LolError, StoreError
from lol_engine.lora.parse import load_lora
from lol_engine.lora.safe_io import ReadLimits
from lol_engine.report import describe

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lol", description="Explore LoRA adapters without running them.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="read a LoRA file or PEFT folder and report its modules")
    inspect.add_argument("path", help="a .safetensors file, or a folder with adapter_model.safetensors")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.add_argument(
        "--max-file-mb", type=float, default=ReadLimits.max_file_bytes / 2**20, help="refuse larger files (MiB)"
    )
    analyse = commands.add_parser(
        "analyse", help="what the app's upload tab shows: the card, every fitting prediction, the nearest LoRAs"
    )
    analyse.add_argument("path", help="a .safetensors file, or a folder with adapter_model.safetensors")
    analyse.add_argument(
        "--db", default=None, help="DuckDB file to find neighbours in (default: $LOL_DATA_DIR/lol.duckdb)"
    )
    analyse.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    zoo = commands.add_parser("zoo", help="build LoRA zoos from real models and data")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_commands.add_parser("list", help="list the zoo recipes")
    build = zoo_commands.add_parser("build", help="build (or finish building) a zoo")
    build.add_argument("name", help="recipe name (see `lol zoo list`)")
    build.add_argument("--out", required=True, help="output folder; an interrupted build continues there")
    build.add_argument("--n", type=int, default=None, help="number of LoRAs (default: the recipe's)")
    build.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    build.add_argument("--seed", type=int, default=0, help="zoo seed")
    build.add_argument("--ranks", default="4", help="comma-separated ranks each LoRA's rank is drawn from")
    build.add_argument(
        "--base-variant", type=int, default=0, choices=(0, 1), help="1: base after continued pretraining"
    )
    build.add_argument("--threads", type=int, default=1, help="torch threads per worker (recorded)")
    build.add_argument("--toy", action="store_true", help="tiny data and training, for tests")
    build.add_argument(
        "--upto", type=int, default=None, help="build only LoRAs 0..UPTO-1 (a resumable chunk of a large zoo)"
    )
    report = zoo_commands.add_parser("report", help="label spreads, cost per LoRA and trivial baselines of a zoo")
    report.add_argument("zoo", help="a built zoo folder (with manifest.parquet)")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    train = commands.add_parser("train", help="train a LoL model on a label of a zoo or of a stored collection")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", help="a built zoo folder")
    source.add_argument("--db", help="a collection (DuckDB file): learn on its stored, labelled LoRAs")
    train.add_argument("--task", "--label", dest="label", required=True, help="label name, e.g. quality, classes")
    train.add_argument(
        "--model",
        default="spectral_glnet",
        help="mlp, o_align, svd, dense, gl_net, transformer, spectral_glnet (default), module_tokens (any module set)",
    )
    train.add_argument("--base-family", default=None, help="--db: only LoRAs of this base family (e.g. sd1)")
    train.add_argument("--collection", default=None, help="--db: only LoRAs of this collection (a zoo, or uploads)")
    train.add_argument("--group", default=None, help="--db: split by this label (default: a 'group' label if any)")
    train.add_argument("--seeds", type=int, default=3, help="independent runs; metrics are mean ± std")
    train.add_argument("--epochs", type=int, default=30, help="epochs (the best on validation is kept)")
    train.add_argument("--no-fold-scale", action="store_true", help="feed raw factors, ignoring alpha/r (paper code)")
    train.add_argument(
        "--out",
        help="save the predictor (best seed on validation) to this folder; --db: default <db folder>/predictors/"
        "<label>-<model>, where the collection uses it (uploads, maps, exports)",
    )
    predict = commands.add_parser("predict", help="predict labels of one LoRA with a trained predictor")
    predict.add_argument("path", help="a LoRA file or PEFT folder")
    predict.add_argument("--model", required=True, help="a predictor folder (model.safetensors + config.json)")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    ingest = commands.add_parser("ingest", help="add LoRAs (files, folders, zoos, Hub repo ids) to the store")
    ingest.add_argument("paths", nargs="*", help="LoRA files, PEFT folders, zoo folders or Hugging Face repo ids")
    ingest.add_argument(
        "--from-list", default=None, help="a text file of paths, repo ids or http(s) URLs (--engine ray), one a line"
    )
    ingest.add_argument(
        "--hub", default=None, help="Hugging Face repo ids (comma-separated), or a Hub search for LoRA adapters"
    )
    ingest.add_argument("--hub-limit", type=int, default=1000, help="--hub search: at most this many repos")
    ingest.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: this process (default); ray: Ray Data tasks and actors, locally or on a cluster (--address)",
    )
    ingest.add_argument("--address", default=None, help="--engine ray: a Ray cluster ('auto': the one running here)")
    ingest.add_argument(
        "--out", default=None, help="--engine ray: the Parquet shard folder (default: beside the database, .shards)"
    )
    ingest.add_argument(
        "--workers", type=int, default=None, help="--engine ray: parallel workers (default: half the CPUs Ray sees)"
    )
    ingest.add_argument("--db", default=None, help="DuckDB file (default: $LOL_DATA_DIR/lol.duckdb)")
    ingest.add_argument("--predictors", default=None, help="a folder of predictor folders (default: the shipped ones)")
    ingest.add_argument(
        "--labels", default=None, help="a .csv or .parquet table: one key column, one column per label"
    )
    ingest.add_argument(
        "--key",
        default="name",
        choices=("name", "path", "sha256"),
        help="the labels table's key column: the LoRA's display name (default), its path under PATH, or sha256",
    )
    ingest.add_argument(
        "--no-metadata-labels",
        action="store_true",
        help="do not store the labels files carry (kohya training fields and tags, PEFT config, modelspec)",
    )
    calibrate = commands.add_parser("calibrate", help="split-conformal calibration of predictors on their zoo")
    calibrate.add_argument("predictors", nargs="+", help="predictor folders (config.json is updated in place)")
    calibrate.add_argument("--zoo", default=None, help="zoo folder (default: the zoo recorded in config.json)")
    calibrate.add_argument("--coverage", type=float, default=0.9, help="nominal coverage of intervals and sets")
    predictors = commands.add_parser("predictors", help="predictors in words, and their out-of-domain references")
    predictor_commands = predictors.add_subparsers(dest="predictors_command", required=True)
    reference = predictor_commands.add_parser(
        "reference", help="write each predictor's domain reference and threshold (and its label's description)"
    )
    reference.add_argument("folders", nargs="+", help="predictor folders (config.json is updated in place)")
    reference.add_argument("--zoo", default=None, help="zoo folder (default: the zoo recorded in config.json)")
    reference.add_argument("--k", type=int, default=5, help="nearest training LoRAs averaged per distance")
    reference.add_argument("--quantile", type=float, default=0.99, help="held-out quantile that sets the threshold")
    glossary = predictor_commands.add_parser("glossary", help="what each predictor predicts and what it knows")
    glossary.add_argument("folders", nargs="*", help="predictor folders (default: the shipped predictors)")
    glossary.add_argument("--json", action="store_true", help="print one JSON list")
    serve = commands.add_parser("serve", help="start the explorer app (ingests the default zoo on first run)")
    serve.add_argument("--db", default=None, help="DuckDB file (default: $LOL_DATA_DIR/lol.duckdb)")
    serve.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    serve.add_argument("--host", default=None, help="address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    export = commands.add_parser("export", help="back up a collection (database and uploads) to a new folder")
    export.add_argument("out", help="a new folder: it receives lol.duckdb and uploads/ (usable as LOL_DATA_DIR)")
    export.add_argument("--db", default=None, help="DuckDB file (default: $LOL_DATA_DIR/lol.duckdb)")
    index = commands.add_parser("index", help="neighbour indexes of a collection (lol_engine.ann): status, rebuild")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    for verb, text in (
        ("status", "per index: stored rows, kind (exact scan or HNSW), file size, rows not in its file"),
        ("build", "rebuild the indexes from the stored embeddings and write them beside the database"),
    ):
        sub = index_commands.add_parser(verb, help=text)
        sub.add_argument("--db", default=None, help="DuckDB file (default: $LOL_DATA_DIR/lol.duckdb)")
        sub.add_argument("--encoder", action="append", default=None, help="only this encoder (repeatable)")
    info = commands.add_parser("info", help="settings, data folder, shipped predictors, default zoos, versions")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    from lol_engine.train.calibrate import calibrate_folder
    from lol_engine.train.loop import load_zoo

    zoos: dict[str, Any] = {}
    for folder in args.predictors:
        recorded = json.loads((Path(folder) / "config.json").read_text()).get("zoo")
        zoo_path = args.zoo or recorded
        if zoo_path is None:
            print(f"error: {folder}: no zoo recorded in config.json; pass --zoo", file=sys.stderr)
            return 2
        try:
            if zoo_path not in zoos:
                zoos[zoo_path] = load_zoo(zoo_path)
            result = calibrate_folder(folder, zoos[zoo_path], coverage=args.coverage)
        except (LolError, OSError) as exc:
            print(f"error: {folder}: {exc}", file=sys.stderr)
            return 2
        print(
            f"{folder}: q = {result['q']:.4g}, test coverage {result['test_coverage']:.3f} "
            f"(nominal {args.coverage}), mean size {result['test_mean_size']:.3g}"
        )
    return 0


def _predictors(args: argparse.Namespace) -> int:
    """``lol predictors reference|glossary``."""
    from lol_engine.train import load_predictor
    from lol_engine.train.domain import reference_folder
    from lol_engine.train.loop import load_zoo

    if args.predictors_command == "glossary":
        from lol_engine.encoders import load_predictors

        try:
            found = [load_predictor(f) for f in args.folders] if args.folders else list(load_predictors().values())
        except (LolError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        entries = [p.glossary.to_json() for p in found]
        if args.json:
            json.dump(_strict(entries), sys.stdout, indent=2, allow_nan=False)
            sys.stdout.write("\n")
        for g in [] if args.json else entries:
            print(f"{g['predictor']}: {g['title']}\n  {g['meaning']}\n  held-out skill: {g['skill_text']}")
        return 0
    zoos: dict[str, Any] = {}
    for folder in args.folders:
        try:
            zoo_path = args.zoo or json.loads((Path(folder) / "config.json").read_text()).get("zoo")
            if zoo_path is None:
                raise BadRequestError("no zoo recorded in config.json; pass --zoo")
            if zoo_path not in zoos:
                zoos[zoo_path] = load_zoo(zoo_path)
            entry = reference_folder(folder, zoos[zoo_path], k=args.k, quantile=args.quantile)
        except (LolError, OSError) as exc:
            print(f"error: {folder}: {exc}", file=sys.stderr)
            return 2
        size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        print(
            f"{folder}: threshold {entry['threshold']:.4g} (held-out median {entry['held_out_median']:.4g}, "
            f"{entry['n_reference']} training LoRAs × {entry['embedding_dim']}), folder {size / 1024:.0f} KiB"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:  # the app owns its entry point; the engine never imports it otherwise
        from app.serve import main as serve_app
    except ModuleNotFoundError as exc:
        print(
            f"error: the app is not installed ({exc}): install lol-explorer with its app extra, "
            "pip install 'lol-explorer[app]'",
            file=sys.stderr,
        )
        return 2
    return serve_app(db=args.db, port=args.port, host=args.host)


def _info(args: argparse.Namespace) -> int:
    from lol_engine.settings import info_report, settings

    try:
        report = info_report(settings())
    except BadRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    collection = report["collection"]
    size = (
        f"{collection['loras']} LoRA(s), {collection['bytes']:,} bytes" if collection["exists"] else "not created yet"
    )
    zoos = ", ".join(report["default_zoos"]) or f"none found; {report['how_to_get_zoos']}"
    lines = [
        f"lol-explorer {report['version']}",
        f"data folder   {report['data_dir']['path']} ({report['data_dir']['source']})",
        f"collection    {collection['path']}: {collection.get('error', size)}",
        f"zoo folder    {report['zoo_dir']['path']} ({report['zoo_dir']['source']})",
        f"default zoos  {zoos}",
        f"device        {report['device']['resolved']} (LOL_DEVICE: {report['device']['setting'] or 'automatic'})",
        f"upload cap    {report['max_upload']:,} bytes",
        f"predictors    {report['predictors_dir']}",
        *(
            f"  {p['name']:22s} base {p['base']:12s} {p['task']} ({p['kind']}, {p['model']})"
            for p in report["predictors"]
        ),
        "versions      " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    print("\n".join(lines))
    return 0


def _export(args: argparse.Namespace) -> int:
    import shutil

    from lol_engine.settings import settings
    from lol_engine.store import LoraStore

    try:
        db = Path(args.db) if args.db else settings().db_path
    except BadRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; export into a new folder", file=sys.stderr)
        return 2
    if not db.is_file():
        print(f"error: {db}: no collection there", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        with LoraStore(db) as store:  # the app must be stopped: one process per database file
            store.backup(out / "lol.duckdb")
            n = store.count()
        uploads = db.parent / "uploads"
        if uploads.is_dir():  # stored uploads; dot folders are staging and held uploads
            shutil.copytree(uploads, out / "uploads", ignore=shutil.ignore_patterns(".*"))
    except (StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} LoRA(s) exported to {out} (restore: stop the app, copy its contents into the data folder)")
    return 0


def _index(args: argparse.Namespace) -> int:
    from lol_engine.ann import NeighbourIndexes, faiss_available
    from lol_engine.store import LoraStore

    try:
        with LoraStore(args.db) as store:
            indexes = NeighbourIndexes(store)
            if args.index_command == "build":
                if not faiss_available():
                    print("faiss is not installed (pip install 'lol-explorer[scale]'): searches stay exact scans")
                for encoder, seconds in indexes.rebuild(args.encoder).items():
                    print(f"{encoder}: rebuilt in {seconds:.1f} s")
            for row in indexes.status():
                if args.encoder and row.encoder not in args.encoder:
                    continue
                where = row.encoder if row.family is None else f"{row.encoder} [{row.family}]"
                size = f"{row.file_bytes / 2**20:.1f} MB" if row.file_bytes else "-"
                print(f"{where}: {row.rows} row(s), {row.kind}, {size}, {row.state}")
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _ingest_paths(args: argparse.Namespace) -> list[str]:
    """Every source named on the command line: PATHs, then --from-list's lines, then --hub's repos."""
    from lol_engine.scale.sources import hub_repo_ids, is_url, read_list

    paths = list(args.paths)
    if args.from_list:
        paths += read_list(args.from_list)
    if args.hub:
        paths += hub_repo_ids(args.hub, args.hub_limit)
    if not paths:
        raise BadRequestError("nothing to ingest: give PATHs, --from-list FILE or --hub IDS_OR_QUERY")
    urls = [p for p in paths if is_url(p)]
    if urls and args.engine != "ray":
        raise BadRequestError(f"{len(urls)} URL(s) given (first: {urls[0][:100]}); URLs are read by --engine ray")
    return paths


def _ingest(args: argparse.Namespace) -> int:
    from lol_engine.encoders import encoders_for, load_predictors
    from lol_engine.ingest import ingest
    from lol_engine.labels import read_labels
    from lol_engine.store import LoraStore

    try:
        paths = _ingest_paths(args)
        table = read_labels(args.labels, args.key) if args.labels else None
    except LolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.engine == "ray":
        return _ingest_ray(args, paths, table)
    encoders = encoders_for(load_predictors(args.predictors))
    try:
        with LoraStore(args.db) as store:
            report = ingest(paths, store, encoders, labels=table, metadata=not args.no_metadata_labels)
            if table is not None and report.labels is not None:
                print("\n".join(report.labels.summary(table)))
            print(f"{len(report.ids)} ingested; {store.count()} LoRA(s) in the store {store.path}")
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, reason in report.refused:
        print(f"refused {path}: {reason}", file=sys.stderr)
    return 2 if report.refused else 0


def _ingest_ray(args: argparse.Namespace, paths: list[str], table: Any) -> int:
    """``lol ingest --engine ray``: shards under --out, then loaded into --db; refusals listed in errors.parquet."""
    try:
        import ray  # noqa: F401  (the optional extra: say so before any work)

        from lol_engine.scale import ray_ingest
        from lol_engine.settings import settings
        from lol_engine.store import LoraStore
    except ModuleNotFoundError as exc:
        print(f"error: --engine ray needs Ray ({exc}): pip install 'lol-explorer[scale]'", file=sys.stderr)
        return 2
    try:
        db = Path(args.db) if args.db else settings().db_path
        out = Path(args.out) if args.out else db.with_suffix(".shards")
        with LoraStore(db) as store:
            report = ray_ingest(
                paths,
                out,
                store,
                predictors=args.predictors,
                labels=table,
                metadata=not args.no_metadata_labels,
                workers=args.workers,
                address=args.address,
            )
            if table is not None and report.labels is not None:
                print("\n".join(report.labels.summary(table)))
            print(report.summary())
            print(f"{report.added} new in the store; {store.count()} LoRA(s) in the store {store.path}")
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, reason in report.refused[:20]:
        print(f"refused {path}: {reason}", file=sys.stderr)
    if len(report.refused) > 20:
        print(f"... and {len(report.refused) - 20} more: see errors.parquet in {out}", file=sys.stderr)
    return 2 if report.refused else 0


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from lol_engine.settings import settings
    from lol_engine.train import TrainConfig, load_zoo, save_predictor, train_on_zoo
    from lol_engine.train.checkpoint import seen_digests, zoo_base

    if args.db:
        return _train_on_collection(args)
    try:
        zoo = load_zoo(args.zoo)
        device = settings().resolved_device()  # LOL_DEVICE: a GPU when torch sees one
        runs = []
        for seed in range(args.seeds):
            config = TrainConfig(epochs=args.epochs, seed=seed, fold_scale=not args.no_fold_scale, device=device)
            runs.append(train_on_zoo(zoo, args.label, args.model, config=config))
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in runs[0][2]["test"]:
        values = np.array([r[2]["test"][name] for r in runs])
        print(f"test {name:10s} {values.mean():.4f} ± {values.std():.4f}  ({args.seeds} seeds)")
    if args.out:
        model, task, result = min(runs, key=lambda r: r[2]["val"]["loss"])
        save_predictor(
            args.out,
            model,
            task,
            args.model,
            not args.no_fold_scale,
            {
                "zoo": str(args.zoo),
                "base": zoo_base(zoo),
                "result": {k: result[k] for k in ("val", "test")},
                "seen": seen_digests(zoo),
            },
        )
        print(f"predictor: {args.out}")
    return 0


def _train_on_collection(args: argparse.Namespace) -> int:
    from lol_engine.explorer import Explorer

    if not Path(args.db).is_file():
        print(f"error: {args.db}: no collection there", file=sys.stderr)
        return 2
    explorer = Explorer.open(args.db)
    try:
        report = explorer.train(
            args.label,
            args.model,
            base_family=args.base_family,
            collection=args.collection,
            group=args.group,
            epochs=args.epochs,
            seeds=args.seeds,
            fold_scale=not args.no_fold_scale,
            out=args.out,
        )
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        explorer.close()
    print("\n".join(report.lines()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lol_engine.train import load_predictor

    try:
        predictor = load_predictor(args.model)
        estimate = predictor.predict(load_lora(args.path))
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": predictor.config["model"], **estimate.to_json()}, indent=2))
        return 0
    if estimate.kind in ("categorical", "multilabel"):
        shown = ", ".join(f"{k}: {v:.3f}" for k, v in estimate.probabilities.items())
    else:
        shown = f"{estimate.value:.4g}" if isinstance(estimate.value, float) else str(estimate.value)
        shown += "" if estimate.probability is None else f" (p = {estimate.probability:.3f})"
    far = "FAR from its training LoRAs" if estimate.out_of_domain else ""
    extra = [t for t in (estimate.range_text(), "in its training set" if estimate.in_sample else "", far) if t]
    print(f"{estimate.label} ({predictor.config['model']}): {shown}" + (f"  [{'; '.join(extra)}]" if extra else ""))
    return 0


_CARD_KEYS = (
    "source",
    "format",
    "base_family",
    "evidence",
    "sha256",
    "autov2",
    "addnet_sha256",
    "addnet_shorthash",
    "sshs_model_hash",
    "sshs_model_hash_matches",
    "trigger_words",
    "training_parameters",
    "warnings",
)


def _strict(value: Any) -> Any:
    """JSON-ready data with every non-finite float as ``None`` (strict JSON: ``allow_nan=False``)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _analysis_json(
    analysis: Any, neighbours: list[dict[str, Any]], collection: dict[str, Any], titles: dict[str, str]
) -> dict[str, Any]:
    report = analysis.report
    card = {key: report.get(key) for key in _CARD_KEYS}
    card["metadata"] = {k: report[k] for k in ("kohya_metadata", "modelspec", "adapter_config")}
    predictions = [
        {"target": e.label, "title": titles.get(e.predictor, e.label), **e.to_json()}
        | {"calibrated_range": e.range_text() or None}
        for e in analysis.estimates.values()
    ]
    return _strict({"card": card, "predictions": predictions, "neighbours": neighbours, "collection": collection})


def _analyse(args: argparse.Namespace) -> int:
    """``lol analyse``: the upload tab's analysis through the explorer; a missing collection is never created."""
    import tempfile

    from lol_engine.explorer import Explorer
    from lol_engine.settings import settings

    try:
        db = Path(args.db) if args.db else settings().db_path
        with tempfile.TemporaryDirectory(prefix="lol-analyse-") as scratch:
            exists = db.is_file()  # else: predictions only, through a throw-away collection that stays empty
            explorer = Explorer.open(db if exists else Path(scratch) / "lol.duckdb")
            try:
                titles = {name: p.glossary.title for name, p in explorer.predictors.items()}
                analysis = explorer.analyse(args.path)
                neighbours: list[dict[str, Any]] = []
                for n in explorer.neighbours(analysis.lora, k=10, exclude=analysis.sha256) if exists else []:
                    stored = explorer.find(n.id)
                    family = stored.base_family if stored else None
                    neighbours.append(
                        {"id": n.id, "name": n.name, "base_family": family, "similarity": n.similarity}
                        | {"by": n.by, "relation": n.relation.to_json() if n.relation else None}
                    )
            finally:
                explorer.close()
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = None if exists else f"no collection at {db}: neighbours were not searched (none was created)"
    out = _analysis_json(analysis, neighbours, {"path": str(db), "exists": exists, "note": note}, titles)
    if args.json:
        json.dump(out, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_analysis(out)
    return 0


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)  # piped: never cut names to a guessed width


def _print_card(console: Any, report: dict[str, Any]) -> None:
    """The hashes, trigger words and training parameters (file text escaped: rich reads ``[...]`` as markup)."""
    from rich.markup import escape
    from rich.table import Table

    addnet = report.get("addnet_sha256") or "—"
    console.print(f"AutoV2 {report.get('autov2') or '—'} · kohya/A1111 LoRA hash (addnet) {addnet}")
    if report.get("sshs_model_hash"):
        agrees = {True: "matches", False: "DOES NOT match", None: "not checked"}[report["sshs_model_hash_matches"]]
        console.print(f"metadata sshs_model_hash {escape(report['sshs_model_hash'])} ({agrees})")
    words = report.get("trigger_words") or {}
    named = [
        f"{k.replace('_', ' ')} {escape(str(words[k]))}" for k in ("output_name", "trigger_phrase") if words.get(k)
    ]
    tags = ", ".join(f"{escape(t['tag'])} ({t['count']})" for t in words.get("top_tags", []))
    if named or tags:
        console.print("trigger words: " + " · ".join([*named, *([f"top tags {tags}"] if tags else [])]))
    if report.get("training_parameters"):
        table = Table("parameter", "value", "meaning", title="training parameters")
        for row in report["training_parameters"]:
            table.add_row(escape(row["name"]), escape(row["value"]), escape(row["meaning"]))
        console.print(table)


def _print_analysis(out: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    card = out["card"]
    console.print(f"[bold]{escape(card['source'])}[/bold]")
    console.print(f"format {card['format']} · base {card['base_family']} · sha256 {card['sha256']}")
    console.print(f"evidence: {escape('; '.join(card['evidence']))}")
    _print_card(console, card)
    table = Table("predictor", "what it predicts", "prediction", "calibrated range", "in its training set", "domain")
    table.title = "predictions"
    domain = {None: "unknown", False: "near its training LoRAs", True: "FAR from its training LoRAs"}
    for p in out["predictions"]:
        value = (
            p["value"] if p["kind"] != "multilabel" else f"{sum(v >= 0.5 for v in p['probabilities'].values())} ones"
        )
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        seen = "yes (in-sample)" if p["in_sample"] else ""
        range_text = p["calibrated_range"] or ""
        table.add_row(p["predictor"], escape(p["title"]), escape(shown), range_text, seen, domain[p["out_of_domain"]])
    console.print(table if out["predictions"] else "predictions: no shipped predictor fits this base and layout")
    if out["collection"]["note"]:
        console.print(escape(out["collection"]["note"]))
    else:
        table = Table("similarity", "by", "base", "name", "relation", "id", title="nearest stored LoRAs")
        for n in out["neighbours"]:
            relation = escape(n["relation"]["text"]) if n["relation"] else ""
            row = [
                f"{n['similarity']:.4f}",
                n["by"],
                n["base_family"] or "",
                escape(n["name"]),
                relation,
                n["id"][:12],
            ]
            table.add_row(*row)
        console.print(table)
    for warning in card["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise BadRequestError(f"--ranks {text!r}: give comma-separated whole numbers, e.g. 4,8") from None


def _zoo(args: argparse.Namespace) -> int:
    from lol_engine.zoo import ZooSettings, build_zoo, list_recipes

    if args.zoo_command == "list":
        for name, description in list_recipes().items():
            print(f"{name:20s} {description}")
        return 0
    if args.zoo_command == "report":
        return _zoo_report(args.zoo, args.json)
    try:
        ranks = _ranks(args.ranks)
        settings = ZooSettings(
            n=args.n, seed=args.seed, ranks=ranks, base_variant=args.base_variant, threads=args.threads, toy=args.toy
        )
        manifest = build_zoo(args.name, args.out, settings, workers=args.workers, upto=args.upto)
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"manifest: {manifest}")
    return 0


def _zoo_report(zoo: str, as_json: bool) -> int:
    from lol_engine.zoo.report import summarize_zoo

    try:
        summary = summarize_zoo(zoo)
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:  # NaN (no baseline possible) becomes null: strict JSON
        labels = {k: {n: (None if v != v else v) for n, v in stats.items()} for k, stats in summary["labels"].items()}
        print(json.dumps(summary | {"labels": labels}, indent=2, allow_nan=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 160)
    console.print(
        f"[bold]{summary['zoo']}[/bold]: {summary['n']} LoRAs, splits {summary['splits']}, "
        f"{summary['train_seconds_mean']:.3f} s per LoRA in one worker (training + labels)"
    )
    console.print(f"baselines: {summary['baseline_protocol']}")
    table = Table("label", "spread / rate", "mean / majority baseline (test)", "‖ΔW‖-only baseline (test)")
    for name, stats in summary["labels"].items():
        if "test_r2_norm_only" in stats:
            spread = f"{stats['min']:.3g} … {stats['max']:.3g} (mean {stats['mean']:.3g}, std {stats['std']:.3g})"
            table.add_row(
                name, spread, f"R² {stats['test_r2_mean_baseline']:.3f}", f"R² {stats['test_r2_norm_only']:.3f}"
            )
        else:
            spread = (
                f"positive rate {stats['positive_rate']:.3f}"
                if "positive_rate" in stats
                else f"{stats['n_values']:.0f} values"
            )
            table.add_row(
                name, spread, f"acc {stats['test_acc_majority']:.3f}", f"acc {stats['test_acc_norm_only']:.3f}"
            )
    console.print(table)
    return 0


def _tolerant_streams() -> None:
    """Characters the terminal's encoding lacks (``‖ΔW‖`` in a Latin-1 locale) print as ``?`` instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lol`` console script; returns the exit status."""
    _tolerant_streams()
    args = _parser().parse_args(argv)
    if args.command == "zoo":
        return _zoo(args)
    if args.command == "train":
        return _train(args)
    if args.command == "ingest":
        return _ingest(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "predictors":
        return _predictors(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        return _export(args)
    if args.command == "info":
        return _info(args)
    if args.command == "index":
        return _index(args)
    if args.command == "analyse":
        return _analyse(args)
    try:
        limits = ReadLimits(max_file_bytes=int(args.max_file_mb * 2**20))
        report = describe(load_lora(args.path, limits=limits))
    except (LolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{escape(report['source'])}[/bold]")
    console.print(
        f"format {report['format']} · base {report['base_family']} · dtype {report['dtype']} · "
        f"{report['n_modules']} modules · ranks {report['ranks']} · DoRA {report['is_dora']}"
    )
    console.print(f"evidence: {escape('; '.join(report['evidence']))}")
    console.print(f"sha256 {report['sha256']} · ‖ΔW‖_F total {report['total_delta_fro_norm']:.4g}")
    _print_card(console, report)
    table = Table("kind", "rank", "eff. rank 90/99 %", "alpha", "scale", "d_out × d_in", "‖ΔW‖_F", "σ₁ … σ_r (scaled)")
    table.add_column("module", overflow="fold")
    for m in report["modules"]:
        alpha = "—" if m["alpha"] is None else f"{m['alpha']:g}"
        sigma = " ".join(f"{s:.3g}" for s in m["singular_values"][:6]) + (" …" if m["rank"] > 6 else "")
        shape = f"{m['d_out']} × {m['d_in']}"
        norm = f"{m['delta_fro_norm']:.4g}"
        effective = f"{m['effective_rank_90']}/{m['effective_rank_99']}"
        table.add_row(
            m["kind"], str(m["rank"]), effective, alpha, f"{m['scale']:.4g}", shape, norm, sigma, escape(m["name"])
        )
    console.print(table)
    console.print(f"effective rank: {report['effective_rank_criterion']}")
    blocks = Table("block", "modules", "‖ΔW‖_F", title="strength per block: √(Σ ‖ΔW‖_F²) of its modules")
    for block in report["block_strength"]:
        blocks.add_row(escape(block["block"]), str(block["n_modules"]), f"{block['delta_fro_norm']:.4g}")
    console.print(blocks)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


if __name__ == "__main__":
    raise SystemExit(main())
