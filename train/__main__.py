"""`python -m train fit|embed|probe|behaviour|tune|sample`: what is learned from a catalog (see `--help`).

    python -m train fit --catalog CAT --out RUN [--workers N] [--gpus-per-worker G] [--config FILE] [--epochs E] [--debug]
    python -m train embed --run RUN --catalog CAT
    python -m train probe --catalog CAT [--run RUN] [--format table|json]
    python -m train tune --catalog CAT --out DIR [--samples N] [--resume]
    python -m train sample --run RUN --catalog CAT --out DIR [--anchors K | --where SQL] [--n N] [--method M,...]
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from catalog.cli import WORKER_RESOURCES_HELP, Parser, resources_arg, run, setup_logging
from catalog.errors import WildzooError
from catalog.store import Catalog

log = logging.getLogger("train")


PROBES_HELP = ("images as an .npy array (N, H, W) or (N, C, H, W), read without pickle: the probe inputs of behaviour "
               "fingerprints in place of the built-in data set")


def add_config_args(p, epochs_help: str, what: str = "") -> None:
    """--config, --flavour, --debug and --epochs: what a fit trains (or, with `what` said, every trial of a sweep)."""
    from train.config import FLAVOURS

    p.add_argument("--config", metavar="FILE", help="TOML or JSON settings over the flavour (see train/config.py)"
                   + what)
    p.add_argument("--flavour", choices=FLAVOURS, default=None,
                   help="debug: a tiny backbone, 2 epochs, seconds on a CPU; small (default): minutes on 2 cores for "
                   "~1,000 small checkpoints; base: SANE's CNN-zoo size, for GPUs" + what)
    p.add_argument("--debug", action="store_true", help="the debug flavour (same as --flavour debug)")
    p.add_argument("--epochs", type=int, help=epochs_help)


def config_from_args(args, **flags):
    """The TrainConfig of `add_config_args`' options (flavour, then --config, then --epochs) and `flags` (None:
    left as they are); a bad value is a one-line error."""
    from train.config import TrainConfig

    cfg = TrainConfig.flavour("debug" if args.debug else args.flavour or "small")
    if args.config:
        cfg = TrainConfig.from_file(args.config, base=cfg)
    try:
        return cfg.replace(**{k: v for k, v in {"epochs": args.epochs, **flags}.items() if v is not None})
    except ValueError as e:
        raise WildzooError(str(e)) from None


def build_parser() -> Parser:
    parser = Parser(prog="python -m train", description="Train, evaluate and use weight-space backbones.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser(
        "fit",
        help="train the backbone (Ray Train, data-parallel); rerun the same command to resume",
        description="Train the weight-space backbone (transformer encoder -> token latents -> decoder; NT-Xent "
        "+ masked reconstruction) on windows of the catalog's tokens with Ray Train: DDP over --workers (gloo "
        "on CPUs, NCCL on GPUs), a checkpoint every epoch under RUN/fit. Rerunning the same command resumes "
        "from the last checkpoint (with more --epochs, trains the missing ones). Models the probe validates and "
        "tests on are held out. Writes RUN/model.safetensors, RUN/config.json, RUN/metrics.jsonl and RUN/loss_curve.png.",
    )
    p.add_argument("--catalog", required=True, help="catalog folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (or s3://…) for checkpoints and the model")
    add_config_args(p, "epochs in all (a rerun with more continues the run)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0: CPU, gloo)")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs (threads) per worker (default 1)")
    p.add_argument("--data-cpus", type=float, help="CPUs Ray Data gets for cutting windows, beside the workers' "
                   "(default 1)")
    p.add_argument("--worker-resources", type=resources_arg, metavar="JSON", help=WORKER_RESOURCES_HELP % "trainer")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser(
        "embed",
        help="embed every ok model of a catalog with a run's backbone",
        description="Embed every ok model of the catalog (mean of its token latents) with the backbone of RUN "
        "and write the catalog's embeddings/ table (model_id, run, embedding), replacing the run's older rows.",
    )
    p.add_argument("--run", required=True, help="a run folder of `train fit`")
    p.add_argument("--catalog", required=True)
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward pass (default 256)")
    p.add_argument("--actors", type=int, default=0, help="Ray Data actors that each load the backbone once "
                   "(default: one per GPU, else one per 4 CPUs)")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser(
        "probe",
        help="predict model properties (R² per property and method)",
        description="Predict properties (test accuracy, epoch, generalization gap, hyperparameters) from "
        "model features with ridge (alpha chosen on a validation split), an outlier-safe ridge and "
        "gradient-boosted trees, split by trained model 70/15/15. Baselines: per-layer statistics s(W) "
        "and flattened weights W. Models of a known architecture also get `behaviour` (their fingerprints, "
        "computed first where missing: see `train behaviour`) and `s(W)+behaviour`; with --run, the backbone's "
        "embeddings and `combined` (backbone ⊕ s(W) ⊕ behaviour).",
    )
    p.add_argument("--catalog", required=True)
    p.add_argument("--run", help="a trained backbone run: adds its embeddings as a feature set (embedding the "
                   "catalog first if it has none by this run)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", help="folder for probe.json and pictures (default: CATALOG/_reports/probe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first split (default 0)")
    p.add_argument("--seeds", type=int, default=5, help="split seeds, --seed onwards; every method is scored on "
                   "the same splits and reported as mean ± sd (default 5)")
    p.add_argument("--probes", help=PROBES_HELP)
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser(
        "behaviour",
        help="behaviour fingerprints: run every model of a known architecture on fixed probe inputs",
        description="Rebuild every model whose architecture wildzoo knows (the lab zoo's CNN and MLP, the Model "
        "Zoos CNN (s)) from its tokens, run it on fixed probe inputs (unlabeled digits where the data is the "
        "product's, uniform and smoothed noise otherwise, or your own images with --probes) and store output "
        "summaries per model and probe set in the catalog's `behaviour` table (SQL sees it). A rerun computes "
        "only what is missing; models of other architectures get no fingerprint.",
    )
    p.add_argument("--catalog", required=True)
    p.add_argument("--probes", help=PROBES_HELP)
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser(
        "tune",
        help="sweep the losses with Ray Tune (ASHA), scored by the probe's validation R²",
        description="Sweep gamma (contrastive vs reconstruction), tau, the behavioural loss's weight, the learning "
        "rate, the token normalization and the window with Ray Tune. Each trial is a `train fit` (Ray Train on the "
        "Ray Data stream) into DIR/trials/<trial>; ASHA stops trials whose validation loss falls behind; a trial "
        "that finishes is scored by the probe's validation R² of its embeddings (trees; the test split is never "
        "used). Writes DIR/results.csv, DIR/score.png and DIR/best.json (for `train fit --config DIR/best.json`). "
        "A killed sweep continues with --resume.",
    )
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="sweep folder (local)")
    p.add_argument("--samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in DIR with the settings it was started "
                   "with (finished trials are kept, unfinished ones resume from their last checkpoint)")
    add_config_args(p, "epochs per trial (ASHA's longest)", " (what every trial trains, before the swept values)")
    p.add_argument("--grace", type=int, default=1, help="epochs every trial trains before ASHA may stop it "
                   "(default 1)")
    p.add_argument("--concurrent", type=int, default=0, help="trials at a time (default: one per core its "
                   "workers need)")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser(
        "sample",
        help="generate new models from a run's latent space, with a report that they are not copies",
        description="Encode anchor models (training models of one known architecture: the top K by a property, "
        "or an SQL selection), sample new latents (kde: the published kernel density around the anchors; interp: "
        "two anchors' latents interpolated; gauss: a Gaussian over whole-model latents), decode, de-normalize with "
        "the decoded statistics, and write each sample as a Hugging Face-layout folder DIR/samples/<method>-<i> "
        "(config.json + model.safetensors; `python -m crawl local DIR/samples` catalogs them). No fine-tuning, no "
        "repair. DIR/report.md and report.png: accuracy on the held-out digits split and L2 distance to the nearest "
        "training model, next to the anchors, random initializations, the best training model and anchor + noise "
        "models of the same accuracy.",
    )
    p.add_argument("--run", required=True, help="a run folder of `train fit`")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--anchors", type=int, default=10, metavar="K", help="the top K training models by "
                       "--property (default 10)")
    group.add_argument("--where", metavar="SQL", help="anchors by SQL: a query whose first column is model_id, or "
                       "a condition on the models view")
    p.add_argument("--property", default="test_acc", help="the numeric property --anchors ranks by (default test_acc)")
    p.add_argument("--n", type=int, default=10, help="samples per method (default 10)")
    p.add_argument("--method", default=",".join(("kde", "interp", "gauss")),
                   help="comma-separated methods: kde, interp, gauss (default all)")
    p.add_argument("--bandwidth", default="0.25,0.5,1", help="kde's bandwidths, comma-separated multiples of "
                   "Scott's; each is sampled and reported on its own (default 0.25,0.5,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def sample_command(args) -> int:
    from train.sample import sample

    try:
        bandwidths = tuple(float(b) for b in args.bandwidth.split(",") if b.strip())
    except ValueError:
        raise WildzooError(f"--bandwidth: numbers separated by commas, got {args.bandwidth!r}") from None
    s = sample(args.catalog, args.run, args.out, anchors=args.anchors, where=args.where, n=args.n,
               methods=tuple(m.strip() for m in args.method.split(",") if m.strip()), prop=args.property,
               seed=args.seed, bandwidths=bandwidths)
    print(f"sample: {s['samples']} model(s) of {s['arch']} by {', '.join(s['methods'])} from {s['anchors']} anchors "
          f"in {s['seconds']:.1f}s\n")
    w = max(len(r["set"]) for r in s["sets"])
    print(f"{'set'.ljust(w)}  {'n':>3}  accuracy        of anchors  x chance  nearest training model (L2)")
    for r in s["sets"]:
        print(f"{r['set'].ljust(w)}  {r['n']:>3}  {r['acc_mean']:.3f} ± {r['acc_sd']:.3f}  {r['of_anchors']:>10.1%}  "
              f"{r['x_chance']:>8.1f}  {r['dist_mean']:.2f} ± {r['dist_sd']:.2f}")
    print(f"\nsaved {s['out']}/samples/ ({s['samples']} folders), {s['out']}/report.md, {s['out']}/report.png; "
          f"next: python -m crawl local {s['out']}/samples --catalog CAT2")
    return 0


def tune_command(args) -> int:
    from train.tune import format_table, tune

    base = config_from_args(args)
    if args.concurrent < 0:
        raise WildzooError("--concurrent must be >= 0 (0: automatic)")
    s = tune(args.catalog, args.out, base, samples=args.samples, resume=args.resume, concurrent=args.concurrent,
             grace=args.grace)
    print(f"tune: {s['trials']} trial(s) in {s['seconds']:.0f}s: {s['finished']} finished and scored, {s['stopped']} "
          f"stopped early by ASHA (on {s['metric']}), {s['failed']} failed; sorted by score (mean validation R² of "
          f"the backbone's embeddings, trees)\n")
    print(format_table(s["rows"]))
    print(f"\nsaved {s['csv']}" + (f", {s['plot']}, {s['best']} (trial {s['best_trial']}); next: python -m train "
                                   f"fit --catalog {args.catalog} --out RUN --config {s['best']}" if "best" in s else
                                   " (no trial finished: no best config)"))
    return 0


def behaviour_command(args) -> int:
    from train import fingerprint

    user = fingerprint.load_user_probes(args.probes) if args.probes else None
    s = fingerprint.compute(Catalog.open(args.catalog), user)
    print(f"behaviour: {s['models']} model(s) of a known architecture, {s.get('fingerprinted', 0)} fingerprinted now "
          f"({s['written']} rows), {s['unknown']} of other architectures (no fingerprint) in {s['seconds']:.1f}s"
          + (f" -> {s['path']}" if s["path"] else ""))
    return 0


def probe_command(args) -> int:
    from train.evaluate import format_summary, run_probes, save, summarize

    if args.seeds < 1:
        raise WildzooError("--seeds must be >= 1")
    seeds = list(range(args.seed, args.seed + args.seeds))
    cat = Catalog.open(args.catalog)
    from catalog.query import connect
    from train.features import load_population

    n, ok, tokens = connect(cat, tables=("models",)).execute(
        "SELECT count(*), count(*) FILTER (status = 'ok'), coalesce(sum(n_tokens), 0) FROM models").fetchone()
    pop = load_population(cat)
    embeddings = None
    if args.run:
        from train.embed import run_embeddings
        from train.run import RunDir

        split = RunDir.at(args.run).meta().get("split", {})
        held = set(split.get("seeds", [split.get("seed")]))
        if split.get("holdout") and not set(seeds) <= held:
            log.warning("the backbone held out the test models of split seeds %s, not of %s: some test models may "
                        "have been trained on", sorted(held), sorted(set(seeds) - held))
        embeddings = {"backbone": run_embeddings(cat, args.run, pop.model_ids),
                      "backbone-mean": run_embeddings(cat, args.run, pop.model_ids, column="embedding_mean")}
    from train import fingerprint

    fingerprint.compute(cat, fingerprint.load_user_probes(args.probes) if args.probes else None)
    behaviour = fingerprint.features(cat, pop.model_ids)
    if behaviour is None:
        log.info("no behaviour fingerprint for every probed model (architecture unknown): no behaviour rows")
    results, preds = run_probes(cat, seeds, pop=pop, embeddings=embeddings, behaviour=behaviour)
    summary = summarize(results)
    if args.out:
        out = Path(args.out)
    elif "://" in cat.uri:
        out = Path("wildzoo-reports") / "probe"
    else:
        out = Path(cat.root) / "_reports" / "probe"
    written = save(results, preds, out, summary)
    if args.format == "json":
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        print(f"catalog {cat.uri}: {n} models ({ok} ok), {tokens:,} tokens; probed {len(pop.model_ids)} models "
              f"from {len(set(pop.groups))} trained models, split 70/15/15 by trained model; "
              f"mean ± sd over split seeds {seeds[0]}..{seeds[-1]}"
              + (" (wins over s(W) trees per split in brackets)" if len(seeds) > 1 else "") + "\n")
        print(format_summary(summary))
        print(f"\nsaved {', '.join(str(p) for p in written)}")
    return 0


def reconstruction_line(rec: dict) -> str:
    """The held-out reconstruction of a fit, in one line: per-model MSE against predicting zeros, accuracy kept."""
    from train.behaviour import too_long_line

    line = (f"held-out models: reconstruction MSE median {rec['mse_median']:.4f}, mean {rec['mse_mean']:.4f} per model "
            f"(predicting zeros: {rec['zeros_median']:.4f}, {rec['zeros_mean']:.4f}; R² {rec['r2']:.3f}), normalized "
            f"{rec['norm']}") if rec.get("mse_median") is not None else f"held-out models: reconstruction MSE {rec['mse']:.4f}"
    if rec.get("kept") is not None:
        line += (f"; rebuilt, the {rec['good']} with accuracy >= {rec['min_acc']} keep {rec['kept']:.1%} of it with the "
                 f"decoded statistics ({rec['kept_true']:.1%} with the true ones; all {rec['rebuildable']}: "
                 f"{rec['orig_acc']:.3f} -> {rec['rebuilt_acc']:.3f})")
    elif rec.get("too_long") and not rec.get("rebuildable"):
        line += "; accuracy kept not measured: held-out " + too_long_line(rec["too_long"], rec["too_long_tokens"],
                                                                         rec["window"])
    if rec.get("head_r2"):
        line += "\nbehaviour head, fingerprint of held-out models predicted from weights: R² " + ", ".join(
            f"{k} {v:.3f}" for k, v in rec["head_r2"].items())
    return line


def fit_command(args) -> int:
    from train.fit import fit

    cfg = config_from_args(args, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, data_cpus=args.data_cpus,
                           worker_resources=args.worker_resources or None)
    s = fit(args.catalog, args.out, cfg)
    h = s["history"]
    trained = s["epochs"] - s["start_epoch"]
    if trained:
        what = f"trained epochs {s['start_epoch'] + 1}..{s['epochs']}" + (
            f" (resumed after epoch {s['start_epoch']})" if s["start_epoch"] else "")
    else:
        what = f"nothing to train: already at {s['epochs']} epoch(s)"
    val = f", val {h[0]['val_loss']:.4f} -> {h[-1]['val_loss']:.4f}" if h and "val_loss" in h[-1] else ""
    print(f"fit {s['run_id']}: {what} on {s['workers']} worker(s) in {s['seconds']:.0f}s; "
          f"{s['n_params']:,} parameters; {s['split']['train_models']} models trained on, "
          f"{s['split']['held_out_models']} held out")
    if h:
        shown = h if len(h) <= 12 else [h[round(i * (len(h) - 1) / 11)] for i in range(12)]
        curve = " ".join(f"{int(e['epoch'])}:{e['loss']:.4f}" for e in shown)
        print(f"loss by epoch: {curve}{val}")
    rec = s.get("reconstruction")
    if rec:
        print(reconstruction_line(rec))
    why = f" ({s['norm_reason']})" if s.get("norm_reason") else ""
    print(f"normalization {s['norm']}{why}; saved {s['run'].rstrip('/')}/model.safetensors, config.json, metrics.jsonl, "
          f"loss_curve.png; next: python -m train probe --run {s['run']} --catalog {args.catalog}")
    return 0


def embed_command(args) -> int:
    from train.embed import embed

    if args.batch_size < 1:
        raise WildzooError("--batch-size must be >= 1")
    s = embed(args.catalog, args.run, batch_size=args.batch_size, actors=args.actors)
    print(f"embedded {s['models']} models with run {s['run_id']} (epoch {s['epoch']}, {s['dim']}-d) in "
          f"{s['seconds']:.1f}s -> {s['path']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    if args.command == "fit":
        return fit_command(args)
    if args.command == "embed":
        return embed_command(args)
    if args.command == "probe":
        return probe_command(args)
    if args.command == "behaviour":
        return behaviour_command(args)
    if args.command == "tune":
        return tune_command(args)
    if args.command == "sample":
        return sample_command(args)
    raise WildzooError(f"unknown command {args.command}")


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv, prog="train")


if __name__ == "__main__":
    sys.exit(cli())
