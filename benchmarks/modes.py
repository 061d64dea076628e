"""train_speed.py's --compare-floor, --dry, --gpu and --peer: the command line into speed_floor.py, gpu_rows.py
and peer.py."""

from pathlib import Path

import torch


def new_modes(args, parser):
    """--compare-floor, --dry and --gpu (each in its own module)."""
    options = dict(kv.split("=", 1) for kv in args.option if "=" in kv)
    if len(options) != len(args.option):
        parser.error("--option takes KEY=VALUE (a training option, e.g. full_bf16=true)")
    if args.compare_floor:
        from benchmarks.speed_floor import compare_floor

        model = args.model or "tiny"
        return compare_floor(model, args.resolution or {"tiny": 64}.get(model, 512), args.rounds, args.steps,
                             args.gradient_checkpointing, options, args.clock)
    from benchmarks import gpu_rows

    if args.dry or not torch.cuda.is_available():
        if not args.dry:
            print("no CUDA GPU here: the dry mode (FLOPs and the table's shape); on a GPU: --gpu")
        return gpu_rows.dry()
    peer = None
    if args.peer:
        peer = peer_runner(args, parser)
    return gpu_rows.gpu(extra=options, steps=args.steps or 10, peer=peer, peak=args.peak_tflops)


def peer_runner(args, parser):
    """row -> sd-scripts' s/step on the row's data (model folder and images written once under --peer_dir)."""
    import tempfile

    from benchmarks import peer

    name, path = args.peer
    if name != "sd-scripts":
        parser.error(f"--peer: only sd-scripts is known, not {name!r}")
    if not (Path(path) / "train_network.py").is_file():
        parser.error(f"--peer sd-scripts {path}: no train_network.py there (a kohya-ss/sd-scripts checkout)")
    try:
        n1, n2 = (int(n) for n in args.peer_steps.split(","))
    except ValueError:
        parser.error(f"--peer_steps {args.peer_steps}: two step counts n1,n2 with n1 < n2, e.g. 5,15")
    if not 0 < n1 < n2:
        parser.error(f"--peer_steps {args.peer_steps}: two step counts n1,n2 with n1 < n2, e.g. 5,15")
    root = Path(args.peer_dir or tempfile.mkdtemp(prefix="lora_sd-peer-"))

    def run(row):
        data = peer.write_peer_data(root, row.model, row.resolution)
        seconds = peer.peer_step_time(Path(path), row, data, root / "out", (n1, n2))
        print(f"sd-scripts, {row.name}: {seconds:.4f} s/step")
        return seconds

    return run
