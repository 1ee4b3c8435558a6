"""``memsam``: command-line entry point.

Every sub-command reports usage errors as one line on stderr with exit code 2, and failures with exit code 1;
no tracebacks unless ``MEMSAM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device(args: argparse.Namespace) -> str:
    """--device if given, else CUDA when available, else CPU."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _join_ranks(args: argparse.Namespace):
    """Under torchrun: this process's distributed.Ranks and device (its own GPU on CUDA); else one rank and
    --device."""
    from .distributed import device_for, from_env

    ranks = from_env(args.device, args.dist_timeout)
    return ranks, device_for(ranks, args.device)


def _parse_triplet(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected three numbers separated by commas") from None
    if len(vals) != 3:
        raise UsageError(f"{what} {text!r}: expected three numbers, got {len(vals)}")
    return vals


def _to_ijk(img, xyz, coords: str):
    import numpy as np

    if coords == "ijk":
        return np.asarray(xyz, dtype=float)
    lps = np.asarray(xyz, dtype=float) * (np.array([-1.0, -1.0, 1.0]) if coords == "ras" else 1.0)
    return np.asarray(img.TransformPhysicalPointToContinuousIndex([float(v) for v in lps]))


def _cmd_segment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoints import load_model
    from .fileio import check_output
    from .geometry import read_image
    from .resources import default_model_path
    from .session import InteractiveSession

    if not args.point and not args.box:
        raise UsageError("give at least one --point or --box")
    check_output(args.out)  # before the model runs
    img = read_image(args.image)
    prompts = []
    for text in args.point or []:
        pos, _, kind = text.partition(":")
        kind = kind or "include"
        if kind not in ("include", "exclude"):
            raise UsageError(f"point {text!r}: the suffix must be :include or :exclude")
        prompts.append(("point", _to_ijk(img, _parse_triplet(pos, "point"), args.coords), kind == "include"))
    for text in args.box or []:
        vals = text.split(",")
        if len(vals) != 6:
            raise UsageError(f"box {text!r}: expected six numbers x0,y0,z0,x1,y1,z1")
        a = _to_ijk(img, _parse_triplet(",".join(vals[:3]), "box corner"), args.coords)
        b = _to_ijk(img, _parse_triplet(",".join(vals[3:]), "box corner"), args.coords)
        prompts.append(("box", (a, b), True))
    device = _device(args)
    model = load_model(args.model or default_model_path(), device=device).prepare_for_inference()
    memory = None
    if args.memory:
        from .memory_bank import MemoryBank

        memory = MemoryBank.load(args.memory, model)
    session = InteractiveSession(model, memory=memory)
    session.set_image(img)
    session.add_segment("segment")
    for kind, where, include in prompts:
        if kind == "point":
            session.add_point(where, include)
        else:
            session.add_box(*where)
        print(
            f"{kind} at ijk {tuple(round(float(v), 1) for v in (where if kind == 'point' else where[0]))}: "
            f"{int(session.mask().sum())} voxels, {session.last_timing.get('total_ms', 0):.1f} ms"
        )
    out = Path(args.out)
    session.save_labelmap(out)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .resources import default_bank_path, default_model_path, sample_data_dir

    memory = None if args.no_memory else (args.memory or default_bank_path())
    run_demo(args.model or default_model_path(), args.data or sample_data_dir(), args.out, args.clicks, memory)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import detect_architecture, read_checkpoint

    f = read_checkpoint(args.checkpoint)
    if f.config is not None:
        cfg, desc = f.config, f"{f.config.name} (MemorizingSAM checkpoint)"
    else:
        arch = detect_architecture(f.state_dict)
        cfg, desc = arch.config, arch.describe()
    n = sum(v.numel() for k, v in f.state_dict.items() if not k.endswith("positional_encoding_gaussian_matrix"))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in f.state_dict.values()})
    info = {
        "file": str(args.checkpoint),
        "architecture": desc,
        "parameters": n,
        "dtypes": dtypes,
        "model_spacing_mm": cfg.spacing_mm,
        "input_size": cfg.encoder.img_size,
        "metadata": f.metadata,
    }
    print(json.dumps(info, indent=2))
    return 0


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stem(p) -> str:
    name = p.name
    for suf in _IMAGE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def pair_images_labels(images_dir, labels_dir) -> list[tuple[str, object, object]]:
    """(case, image path, label path) for image files whose stem has a label file of the same stem."""
    from pathlib import Path

    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise UsageError(f"{d}: not a folder")
    labels = {_stem(p): p for p in labels_dir.iterdir() if p.name.endswith(_IMAGE_SUFFIXES)}
    pairs = []
    for p in sorted(images_dir.iterdir()):
        if p.name.endswith(_IMAGE_SUFFIXES):
            stem = _stem(p)
            cand = labels.get(stem) or labels.get(stem.replace("_image", "_label"))
            if cand is not None:
                pairs.append((stem, p, cand))
    if not pairs:
        raise UsageError(f"no image in {images_dir} has a label file of the same name in {labels_dir}")
    return pairs


def _label_names(path, images_dir) -> dict[int, str]:
    from pathlib import Path

    f = Path(path) if path else Path(images_dir).parent / "dataset.json"
    if not f.is_file():
        if path:
            raise UsageError(f"{f}: no such label-names file")
        return {}
    data = json.loads(f.read_text())
    names = data.get("labels", data)
    return {int(k): str(v) for k, v in names.items() if str(k).lstrip("-").isdigit()}


def _cmd_build_memory(args: argparse.Namespace) -> int:

    from .checkpoints import load_model
    from .memory_bank import MemoryBank, build_bank
    from .progress import Progress

    if args.data:
        from pathlib import Path

        from .datasets import load_dataset, targets

        root = Path(args.data)
        meta = load_dataset(root)
        split = None if args.split == "all" else args.split
        pairs, names = [], {}
        for case in meta["cases"]:
            if args.sources and case["source"] not in args.sources.split(","):
                continue
            tg = targets(case, split)
            if tg:
                pairs.append((case["id"], root / case["image"], root / case["label"], [v for v, _ in tg]))
                names.update({v: n for v, n in tg})
        if not pairs:
            raise UsageError(f"{root}: no '{args.split}' structures")
    elif args.images and args.labels:
        pairs = pair_images_labels(args.images, args.labels)
        names = _label_names(args.label_names, args.images)
    else:
        raise UsageError("give --images and --labels, or --data (a 'memsam data fetch' folder)")
    from .distributed import finish

    ranks, device = _join_ranks(args)
    model = load_model(args.model, device=device).prepare_for_inference()
    out = build_bank(model, pairs, names, args.out, layer=args.layer, progress=Progress("build-memory"), ranks=ranks)
    if ranks.main:
        bank = MemoryBank.load(out, model)
        print(
            f"wrote {out}: {len(bank)} entries from {len(pairs)} cases, layer {bank.layer}, "
            f"{out.stat().st_size / 2**20:.1f} MB"
        )
    finish(ranks)
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from .datasets import prepare_dataset

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = set(sources) - {"pyradiomics", "mricron", "phantom"}
    if unknown:
        raise UsageError(f"unknown sources {sorted(unknown)}; choose from pyradiomics, mricron, phantom")
    out = prepare_dataset(args.out, sources, cache=args.cache)
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote {out}: {len(meta['cases'])} cases from {', '.join(sources)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation.baseline import RandomWalkerSegmenter, RegionGrowingSegmenter
    from .evaluation.plots import dice_curve, montage
    from .evaluation.runner import EvalConfig, SessionSegmenter, evaluate
    from .fileio import atomic_text
    from .progress import Progress

    split = None if args.split == "all" else args.split
    sources = tuple(args.sources.split(",")) if args.sources else None
    cfg = EvalConfig(
        clicks=args.clicks, split=split, legacy=args.legacy, sources=sources, max_targets_per_case=args.max_targets
    )
    from .distributed import finish

    ranks, device = _join_ranks(args)
    out = Path(args.out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    methods = []
    if args.model:
        from .checkpoints import load_model

        model = load_model(args.model, device=device).prepare_for_inference()
        memory = None
        if args.memory:
            from .memory_bank import MemoryBank

            memory = MemoryBank.load(args.memory, model)
        methods.append(
            SessionSegmenter(
                model,
                memory=memory,
                legacy=args.legacy,
                product_dtype=args.product_dtype,
                **_edge_refine_arg(args.edge_refine),
            )
        )
    if args.baseline or not args.model:
        methods += [RegionGrowingSegmenter(), RandomWalkerSegmenter()]
    reports = []
    for seg in methods:
        if ranks.main:
            print(f"evaluating {seg.name} ({'legacy' if args.legacy else 'our'} protocol, {args.clicks} clicks)")
        rep = evaluate(seg, args.data, cfg, progress=Progress(seg.name), keep_masks=args.montage, ranks=ranks)
        if rep is None:  # not rank 0: its results went to rank 0
            continue
        examples = rep.pop("_examples", [])
        tag = seg.name.replace(" ", "_").replace("+", "")
        atomic_text(out / f"eval_{tag}.json", json.dumps(rep, indent=1))
        if examples:
            montage(examples, out / f"montage_{tag}.png")
        reports.append(rep)
        o = rep["overall"]
        d = o.get("dice_at_click", [])
        picks = {n: d[n - 1] for n in (1, 5, 10) if n <= len(d)}
        print(
            f"  {o['targets']} targets: "
            + ", ".join(f"Dice@{n} {v:.3f}" for n, v in picks.items())
            + (f", NoC@85 {o['noc85']:.2f}, AUC {o['auc']:.3f}" if o["targets"] else "")
        )
    if ranks.main:
        dice_curve(reports, out / "dice_vs_clicks.png")
        print(f"wrote {out}")
    finish(ranks)
    return 0


def _training_data(args: argparse.Namespace, rank: int = 0):
    """The train split of --data, mixed with generated cases when --procedural / --synthetic ask for them (each
    rank of a torchrun job generating its own)."""
    from .training.data import TrainingData

    real = TrainingData(args.data, split=args.split)
    if not (args.procedural or args.synthetic):
        return real
    from .training.mixed import MixConfig, MixedTrainingData

    mix = MixConfig(p_procedural=args.procedural, p_synthetic=args.synthetic, seed=args.seed)
    return MixedTrainingData(real, mix, rank=rank)


def _add_mix_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--procedural",
        type=float,
        default=0.0,
        help="share of samples from procedural volumes (training/procedural.py)",
    )
    p.add_argument(
        "--synthetic",
        type=float,
        default=0.0,
        help="share of samples painted from the train label maps in new contrasts",
    )


def _start_training(args: argparse.Namespace):
    """What the three training commands do first: join torchrun's ranks (if any), seed, load the training data
    (each rank generating its own cases). Returns (ranks, device, data)."""
    import torch

    ranks, device = _join_ranks(args)
    torch.manual_seed(args.seed)
    return ranks, device, _training_data(args, ranks.rank)


def _train_config(args: argparse.Namespace, steps: int, **overrides):
    """The training loop's config from the options the training commands share (the parent parser), plus
    ``overrides``."""
    from .training.loop import TrainConfig

    shared = {
        "batch": args.batch,
        "seed": args.seed,
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
        "click_loss": args.click_loss,
    }
    return TrainConfig(steps=steps, **{**shared, **overrides})


def _augment_config(args: argparse.Namespace, **overrides):
    """The crops' augmentation from the shared training options, plus ``overrides``."""
    from .training.data import AugmentConfig

    return AugmentConfig(click_offset=args.click_offset, **overrides)


def _cmd_train(args: argparse.Namespace) -> int:

    from .distributed import finish
    from .modeling import build_sam3d
    from .training.loop import train

    ranks, device, data = _start_training(args)
    if args.init:
        from .checkpoints import load_model

        model = load_model(args.init, config=args.config)
    else:
        model = build_sam3d(args.config)
    if ranks.main:
        print(
            f"training {model.cfg.name} ({model.count_parameters():,} parameters) on {len(data)} targets"
            + (f", {ranks.world} processes" if ranks.active else ""),
            file=sys.stderr,
        )
    cfg = _train_config(args, args.steps, lr=args.lr, max_clicks=args.max_clicks, keep_every=args.keep_every)
    aug = _augment_config(args)
    ck = train(model, data, args.out, cfg, aug, device=device, resume=not args.no_resume, ranks=ranks)
    if ranks.main:
        print(f"wrote {ck}")
    finish(ranks)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:

    from .checkpoints import load_model, save_checkpoint
    from .distributed import finish
    from .modeling import build_sam3d
    from .training.distill import DistillConfig, distill_encoder, init_student_from_teacher
    from .training.loop import train

    ranks, device, data = _start_training(args)
    teacher = load_model(args.teacher)
    student = build_sam3d(args.student_config)
    init_student_from_teacher(student, teacher)
    if ranks.main:
        print(
            f"distilling {teacher.cfg.name} -> {student.cfg.name} ({student.count_parameters():,} parameters)",
            file=sys.stderr,
        )
    dcfg = DistillConfig(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
    )
    resume = not args.no_resume
    distill_encoder(student, teacher, data, args.out, dcfg, device=device, resume=resume, ranks=ranks)
    if args.finetune_steps:
        every = min(args.checkpoint_every, max(1, args.finetune_steps // 4))
        cfg = _train_config(args, args.finetune_steps, lr=args.finetune_lr, train_encoder=False, checkpoint_every=every)
        aug = _augment_config(args)
        train(student, data, args.out, cfg, aug, device=device, resume=resume, tag="finetune", ranks=ranks)
    if ranks.main:
        out = save_checkpoint(
            student,
            f"{args.out}/student.pt",
            half=args.half,
            metadata={
                "teacher": str(args.teacher),
                "distill_steps": args.steps,
                "finetune_steps": args.finetune_steps,
            },
        )
        print(f"wrote {out}")
    finish(ranks)
    return 0


def _cmd_finetune_memory(args: argparse.Namespace) -> int:
    import torch

    from .checkpoints import load_model, save_checkpoint
    from .distributed import finish
    from .modeling.config import get_config
    from .progress import Progress
    from .training.memory_finetune import memory_finetune

    ranks, device, data = _start_training(args)
    model = load_model(args.model, dtype=torch.float32)
    sources = [s for s in args.sources.split(",") if s] if args.sources else None
    cfg = _train_config(
        args, args.steps, lr=args.lr, warmup=min(50, args.steps), p_memory=args.p_memory, max_clicks=args.max_clicks
    )
    model, _ = memory_finetune(
        model,
        data,
        args.out,
        cfg,
        get_config(args.config),
        sources,
        args.k,
        memory_lr_scale=args.memory_lr_scale,
        aug=_augment_config(args, flip=False),  # no flips: see memory_finetune
        device=device,
        progress=Progress("training memory") if ranks.main else None,
        ranks=ranks,
        resume=not args.no_resume,
    )
    if ranks.main:
        out = save_checkpoint(
            model,
            f"{args.out}/model.pt",
            half=args.half,
            metadata={"init": str(args.model), "memory_finetune_steps": args.steps, "memory_sources": sources},
        )
        print(f"wrote {out}")
    finish(ranks)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoints import load_model
    from .resources import default_model_path
    from .server import ServerLimits, model_thread, serve
    from .users import Authenticator

    if args.token_file and args.users_file:
        raise UsageError("give --token-file (one shared token) or --users-file (users), not both")
    auth = None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise UsageError(f"{args.token_file}: empty token file")
        auth = Authenticator(token=token)
    elif args.users_file:
        auth = Authenticator(users_file=args.users_file)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    for f in (args.tls_cert, args.tls_key):
        if f and not Path(f).is_file():
            raise UsageError(f"{f}: no such file")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not args.tls_cert and not args.allow_plain_http:
        raise UsageError(
            f"--host {args.host}: plain HTTP beyond this machine would send tokens and images in the clear; give "
            "--tls-cert/--tls-key, or --allow-plain-http behind a TLS proxy (nginx, deploy/nginx.conf)"
        )
    if not loopback and auth is None:
        print(
            "memsam serve: warning: listening beyond this machine without --users-file or --token-file", file=sys.stderr
        )
    device = _device(args)
    if args.max_undo_mb < 0:
        raise UsageError(f"--max-undo-mb {args.max_undo_mb}: expected a number >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a whole number >= 1")
    worker = model_thread()  # load and serve on the same single thread (see server.model_thread)
    if args.threads is not None:
        import torch

        # On the model thread itself: torch's CPU thread count is set per calling thread.
        worker.submit(torch.set_num_threads, args.threads).result()
    model = worker.submit(
        lambda: load_model(args.model or default_model_path(), device=device).prepare_for_inference()
    ).result()
    memory = None
    if args.memory:
        from .memory_bank import MemoryBank

        memory = worker.submit(MemoryBank.load, args.memory, model).result()
    limits = ServerLimits(
        max_upload_bytes=args.max_upload_mb * 2**20,
        max_voxels=args.max_voxels,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        undo_bytes_per_segment=int(args.max_undo_mb * 2**20),
        header_timeout_s=args.header_timeout,
        max_sessions_per_user=args.max_sessions_per_user,
        max_wait_s=args.max_wait,
    )
    scheme = "https" if args.tls_cert else "http"
    print(f"serving {model.cfg.name} on {device} at {scheme}://{args.host}:{args.port}", file=sys.stderr, flush=True)
    serve(
        model,
        args.host,
        args.port,
        memory,
        limits=limits,
        worker=worker,
        auth=auth,
        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
    )
    return 0


def _cmd_users_add(args: argparse.Namespace) -> int:
    from .users import add_user

    token = add_user(args.file, args.name, args.max_sessions)
    print(f"added {args.name} to {args.file}; their token (shown once, give it to them): {token}")
    return 0


def _cmd_web(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .web.config import WebConfig

    token = None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise UsageError(f"{args.token_file}: empty token file")
    elif os.environ.get("MEMSAM_TOKEN"):
        token = os.environ["MEMSAM_TOKEN"]
    if (token or args.ca_file) and not args.server:
        raise UsageError("--token-file/MEMSAM_TOKEN and --ca-file are for a remote --server")
    if args.server and (args.model or args.memory):
        raise UsageError("--server runs the clicks on that server's model: give --model/--memory to 'memsam serve'")
    for d in args.data_dir or []:
        if not Path(d).is_dir():
            raise UsageError(f"--data-dir {d}: no such folder")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a whole number >= 1")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote_browsers:
        raise UsageError(
            f"--host {args.host}: the page has no login and shows patient images; serve it on this machine, or behind "
            "an authenticating TLS proxy with --allow-remote-browsers"
        )
    config = WebConfig(
        model=args.model,
        memory=args.memory,
        use_memory=not args.no_memory,
        device=_device(args) if not args.server else (args.device or "cpu"),  # unused with --server
        threads=args.threads,
        server_url=args.server,
        token=token,
        ca_file=args.ca_file,
        data_dirs=tuple(args.data_dir or ()),
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        volume_rendering=args.volume_rendering,
    )
    try:
        from .web.app import main as web_main
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("trame", "trame_slicer", "slicer", "vtk", "vtkmodules"):
            raise UsageError(f"needs {e.name}: pip install 'MemorizingSAMLib[web]'") from None
        raise
    web_main(config)
    return 0


def _command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """A sub-command whose options follow: its parser, run by ``func(args)``."""
    p = sub.add_parser(name, **kwargs)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="memsam",
        description="MemorizingSAM: interactive 3D segmentation with SAM-Med3D / FastSAM3D / Memorizing SAM models.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    # Options several sub-commands share, as parent parsers.
    dev = argparse.ArgumentParser(add_help=False)
    dev.add_argument("--device", help="cpu or cuda (default: cuda if available; under torchrun each rank's own GPU)")
    served = argparse.ArgumentParser(add_help=False)  # what serve and web run and where they listen
    served.add_argument("--model", help="checkpoint (default: the shipped default model; web: with its memory bank)")
    served.add_argument("--memory", help="memory bank for the model")
    served.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    # The commands that run data-parallel under torchrun.
    dist = argparse.ArgumentParser(add_help=False)
    dist.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="under torchrun: seconds a collective may wait for the other ranks before the job stops with an error",
    )
    # The three training commands.
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--data", required=True, help="a 'memsam data fetch' folder; its train split is used")
    training.add_argument("--split", default="train")
    training.add_argument("--batch", type=int, default=2, help="global batch (split over the ranks under torchrun)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--log-every", type=int, default=10)
    training.add_argument("--checkpoint-every", type=int, default=100)
    training.add_argument("--no-resume", action="store_true", help="start over instead of continuing a run in OUT")
    training.add_argument("--out", required=True, help="run folder")
    _add_mix_options(training)
    training.add_argument(
        "--click-offset",
        type=int,
        default=0,
        help="move the crop centre up to this many crop voxels per axis off click 1 (half of the samples)",
    )
    training.add_argument(
        "--click-loss", type=float, default=0.0, help="weight of the cross-entropy at the clicked voxels"
    )

    p = _command(
        sub,
        "segment",
        _cmd_segment,
        parents=[dev],
        help="segment one structure of an image from points and boxes; write a labelmap with the image's geometry",
        description="Points and boxes are physical coordinates in mm, RAS (Slicer's convention) by default, LPS "
        "(SimpleITK/DICOM) with --coords lps, or voxel indices (i, j, k) in the image's own order with --coords ijk. "
        "Prompts are applied in order, points first, then boxes. The labelmap (1 = the structure) has the input's "
        "size, spacing, origin and direction.",
    )
    p.add_argument("image", help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder")
    p.add_argument("--point", action="append", metavar="X,Y,Z[:include|exclude]", help="a click; repeatable")
    p.add_argument("--box", action="append", metavar="X0,Y0,Z0,X1,Y1,Z1", help="two opposite corners")
    p.add_argument("--coords", choices=["ras", "lps", "ijk"], default="ras")
    p.add_argument("--model", help="checkpoint (default: the shipped default model)")
    p.add_argument("--memory", help="memory bank built for the model")
    p.add_argument("--out", required=True, help="labelmap to write (.nii.gz, .nrrd)")

    p = _command(
        sub, "demo", _cmd_demo, help="segment the shipped sample data with the shipped model from simulated clicks"
    )
    p.add_argument("--model", help="checkpoint (default: the shipped default model)")
    p.add_argument("--memory", help="memory bank (default: the shipped one, if present)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--data", help="dataset folder (default: Resources/SampleData)")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--out", default="out/demo")
    p = _command(sub, "info", _cmd_info, help="describe a checkpoint: architecture, parameters, dtypes, metadata")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt): upstream, bare state dict, or ours")

    p = _command(
        sub,
        "build-memory",
        _cmd_build_memory,
        parents=[dev, dist],
        help="build a memory bank from labelled volumes (one entry per structure per case)",
        description="Each label value of each case becomes one entry: the model-space crop centred at the "
        "structure's interior-most voxel, the memory layer's keys/values (fp16) and a retrieval descriptor. "
        "Images and labels are paired by file name (foo.nii.gz with foo.nii.gz, or foo_image.* with foo_label.*).",
    )
    p.add_argument("--model", required=True, help="checkpoint the bank is for (banks are model-specific)")
    p.add_argument("--images", help="folder of images (NIfTI, NRRD, MHA)")
    p.add_argument("--labels", help="folder of label maps with the same file names")
    p.add_argument("--data", help="instead of --images/--labels: a 'memsam data fetch' folder (its splits apply)")
    p.add_argument("--split", default="train", choices=["train", "heldout", "all"], help="with --data")
    p.add_argument("--sources", help="with --data: comma list of sources to use (e.g. pyradiomics,mricron)")
    p.add_argument("--out", required=True, help="bank file to write (atomically)")
    p.add_argument("--label-names", help="JSON {value: name}; default: dataset.json beside the images folder")
    p.add_argument("--layer", type=int, help="encoder block to store (default: the model config's memory layer)")

    p = _command(
        sub,
        "train",
        _cmd_train,
        parents=[dev, dist, training],
        help="interactive training (simulated clicks, previous logits fed back), with checkpoints and resume",
        description="Trains a named config (or continues --init) on the train split of a 'memsam data fetch' "
        "folder. Writes OUT/train_last.pt (our checkpoint format), OUT/train_last.state.pt (optimizer, RNG) and "
        "OUT/train_log.jsonl; an interrupted run continues from its last checkpoint.",
    )
    p.add_argument("--config", default="memsam_small_teacher", help="model config name")
    p.add_argument("--init", help="start from this checkpoint instead of random weights")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--max-clicks", type=int, default=5)
    p.add_argument("--keep-every", type=int, default=0, help="also keep fp16 weights every N steps (curves)")

    p = _command(
        sub,
        "distill",
        _cmd_distill,
        parents=[dev, dist, training],
        help="layer-wise progressive distillation of a student encoder from a teacher, then decoder fine-tuning",
        description="Student block i learns teacher block 2i+1; layers join the loss progressively (stage s trains "
        "blocks 0..s-1, the image embedding joins in the last stage); the teacher is frozen. Then the prompt "
        "encoder and mask decoder are fine-tuned with the interactive loop. Writes OUT/student.pt.",
    )
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--student-config", default="memsam_tiny_student")
    p.add_argument("--steps", type=int, default=600, help="distillation steps")
    p.add_argument("--finetune-steps", type=int, default=200, help="decoder fine-tuning steps (0: none)")
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--half", action="store_true", help="store the student's weights in fp16")

    p = _command(
        sub,
        "finetune-memory",
        _cmd_finetune_memory,
        parents=[dev, dist, training],
        help="fine-tune a model with memory attention active so that it uses a memory bank",
        description="Converts the model to a config with learned memory gates and mask-aware memory values, builds "
        "an in-RAM memory of the training structures (from --sources), and trains with the interactive loop; a "
        "share --p-memory of the samples attends over the k nearest other structures. The weights producing the "
        "memory layer's keys/values stay frozen. Writes OUT/model.pt; build its bank with build-memory.",
    )
    p.add_argument("--model", required=True, help="checkpoint to start from (e.g. a distilled student)")
    p.add_argument("--config", default="memsam_tiny_memory", help="memory config of the same shapes")
    p.add_argument("--sources", default="pyradiomics,mricron", help="comma list of sources the memory holds")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--k", type=int, default=3, help="neighbours retrieved")
    p.add_argument("--p-memory", type=float, default=0.5, help="share of samples trained with memory")
    p.add_argument("--max-clicks", type=int, default=5)
    p.add_argument("--memory-lr-scale", type=float, default=10.0, help="learning-rate factor of the new memory weights")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")

    p = _command(
        sub,
        "serve",
        _cmd_serve,
        parents=[dev, served],
        help="HTTP inference server for remote clients (Slicer's remote mode, RemoteSession)",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", help="file holding one bearer token that every client sends (one user)")
    p.add_argument("--users-file", help="users and their token hashes ('memsam users add'); re-read when it changes")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument(
        "--allow-plain-http", action="store_true", help="plain HTTP on a non-loopback address (behind a TLS proxy)"
    )
    p.add_argument("--max-sessions-per-user", type=int, default=4, help="a user's oldest session goes beyond this")
    p.add_argument(
        "--max-wait", type=float, default=10.0, help="seconds of queued model work beyond which requests get 503"
    )
    p.add_argument("--max-upload-mb", type=int, default=512)
    p.add_argument("--max-voxels", type=int, default=1024**3)
    p.add_argument("--max-sessions", type=int, default=16)
    p.add_argument("--idle-timeout", type=float, default=3600.0, help="seconds before an unused session is dropped")
    p.add_argument(
        "--max-undo-mb", type=float, default=64.0, help="undo history per segment (oldest steps dropped beyond it)"
    )
    p.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a request's headers may take to arrive (default 10)"
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads for the model (default: torch's, one per core); less on a shared host"
    )

    p = _command(
        sub,
        "web",
        _cmd_web,
        parents=[dev, served],
        help="the interactive tool in a web browser, on Slicer's core (trame-slicer; needs the [web] extra)",
    )
    p.add_argument("--no-memory", action="store_true", help="no memory bank, not even the default model's")
    p.add_argument("--server", help="run the clicks on this 'memsam serve' (URL) instead of in this process")
    p.add_argument("--token-file", help="the server's token for --server (or MEMSAM_TOKEN in the environment)")
    p.add_argument("--ca-file", help="certificate (PEM) that --server's TLS certificate is checked against")
    p.add_argument(
        "--data-dir", action="append", help="folder whose volumes the page may open (repeatable; samples always)"
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--allow-remote-browsers", action="store_true", help="bind beyond loopback (behind an authenticating proxy)"
    )
    p.add_argument("--max-upload-mb", type=int, default=1024)
    p.add_argument("--volume-rendering", action="store_true", help="volume rendering in the 3D view (slow on CPU)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for the model (default: one fewer than the cores; the rest render the views)",
    )

    p = sub.add_parser("users", help="manage a server's users file")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION")
    u = usub.add_parser("add", help="add a user with a new token (printed once; only its hash is stored)")
    u.add_argument("name")
    u.add_argument("--file", required=True, help="the users file (made if missing)")
    u.add_argument("--max-sessions", type=int, help="this user's session quota (default: the server's)")
    u.set_defaults(func=_cmd_users_add)

    p = sub.add_parser("data", help="get the evaluation/training data (package registries only)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = dsub.add_parser("fetch", help="download/generate and convert into images/, labels/, dataset.json")
    f.add_argument("--out", default="data/eval", help="dataset folder to write (default data/eval)")
    f.add_argument("--sources", default="pyradiomics,mricron,phantom", help="comma list: pyradiomics,mricron,phantom")
    f.add_argument("--cache", help="where downloads go (default: beside --out, in downloads/)")
    f.set_defaults(func=_cmd_data_fetch)

    p = _command(
        sub,
        "evaluate",
        _cmd_evaluate,
        parents=[dev, dist],
        help="simulated-click evaluation: Dice after each click, NoC, latency; JSON and PNGs",
        description="Click 1 at the target's interior-most voxel, each next click at the interior-most voxel of the "
        "largest error region (include where under-segmented). Our protocol: the crop follows the clicks as in a "
        "real session. --legacy: the published protocol (crop centred on the ground truth, newest click only, best "
        "Dice over clicks), for comparison with published numbers.",
    )
    p.add_argument("--model", help="checkpoint; omit to run only the region-growing baseline")
    p.add_argument("--data", required=True, help="dataset folder written by 'memsam data fetch'")
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--sources", help="comma list of sources to use (default: all in the dataset)")
    p.add_argument("--max-targets", type=int, help="at most this many structures per case")
    p.add_argument("--memory", help="memory bank for the model")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the classic baselines: SimpleITK region growing, scikit-image random walker",
    )
    p.add_argument("--legacy", action="store_true", help="the published protocol (see above)")
    p.add_argument(
        "--product-dtype",
        choices=["bfloat16"],
        help="the decoder's large products with the image tokens in this dtype (SessionOptions.product_dtype); "
        "default exact",
    )
    p.add_argument(
        "--edge-refine",
        metavar="RADIUS_MM,EPS|off",
        help="the session's edge refinement (SessionOptions.edge_refine: a guided filter with windows of this "
        "half-width in mm and this regularisation, e.g. 2,0.001, the default; 'off': the model's masks as they are; "
        "always off with --legacy)",
    )
    p.add_argument("--montage", type=int, default=6, help="cases in the PNG montage")
    p.add_argument("--out", default="out/eval", help="folder for JSON and PNGs")
    return ap


def _edge_refine_arg(text: str | None) -> dict:
    """--edge-refine as SessionSegmenter keywords: {} for the session's default, None for 'off', else the config;
    a clear error for anything else."""
    if text is None:
        return {}
    if text == "off":
        return {"edge_refine": None}
    from .edge_refine import EdgeRefineConfig

    try:
        return {"edge_refine": EdgeRefineConfig.parse(text)}
    except ValueError as e:
        raise SystemExit(f"--edge-refine: {e} (or 'off')") from None


def _glue_negative_coordinates(argv: list[str]) -> list[str]:
    """``--point -12.5,3,4`` would read as an unknown option to argparse: glue such values to their option."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--point", "--box"):
            nxt = next(it, None)
            if nxt is not None and nxt.startswith("-") and nxt[1:2].isdigit() or (nxt or "").startswith("-."):
                out.append(f"{a}={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
        else:
            out.append(a)
    return out


# What the "model" extra brings (pyproject.toml): a command needing one of them says so instead of a traceback.
MODEL_EXTRA = ("torch", "SimpleITK", "scipy", "tqdm", "fastapi", "uvicorn", "matplotlib", "skimage")


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(_glue_negative_coordinates(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return 2
    try:
        from .checkpoints import CheckpointError
    except ModuleNotFoundError:  # the client-only install: no checkpoint can be read, none can be wrong

        class CheckpointError(Exception):
            pass

    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if os.environ.get("MEMSAM_DEBUG") or e.name not in MODEL_EXTRA:
            raise
        print(
            f"memsam {args.command}: error: needs {e.name}, which this install lacks (it has the remote client "
            "only): pip install 'MemorizingSAMLib[model]'",
            file=sys.stderr,
        )
        return 1
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        if os.environ.get("MEMSAM_DEBUG"):
            raise
        print(f"memsam {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
