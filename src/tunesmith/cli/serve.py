"""``tunesmith serve``: the OpenAI-compatible API and the no-code studio (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse

from tunesmith.cli.common import status
from tunesmith.core.errors import TunesmithError


def register(commands) -> None:
    serve = commands.add_parser("serve", help="Serve models by an OpenAI-compatible API, and the web studio.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (loopback unless --api-key is given).")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workspace", default="tunesmith-workspace",
                       help="Folder of data, recipes, runs, exports and the job store (created if missing).")
    serve.add_argument("--api-key", help="Required on every route; needed to bind beyond loopback.")
    serve.add_argument("--model", action="append", default=[], metavar="[ID=]PATH",
                       help="A base model outside the workspace to serve and train from (repeatable).")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (for serving; jobs use their recipe's)")
    serve.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "auto"],
                       help="Weights of served models. auto (the default): bfloat16 where the CPU/GPU computes it "
                            "natively (AMX, AVX-512 BF16, a recent GPU), else float32; the start line says which. "
                            "bfloat16 decodes a crowd of requests faster and stays batch-invariant (a seed gives the "
                            "same reply alone or in a crowd); its replies differ from float32's (tunesmith "
                            "generate's) by rounding. float32: replies equal generate's (docs/speed.md).")
    serve.add_argument("--max-upload-mb", type=int, default=200, help="Largest data file the studio accepts.")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="How long generation waits to batch concurrent requests together.")
    serve.add_argument("--allow-code", action="store_true",
                       help="Let recipes from the browser name code: reward functions (module:function), "
                            "trust_remote_code, lm-eval include paths. Off: refused with 403 (docs/studio.md).")
    serve.add_argument("--allow-remote-models", action="store_true",
                       help="Let recipes from the browser name a Hugging Face hub id as model.name (the job downloads "
                            "it). Off: only built-in aliases, --model bases and workspace folders (403 otherwise).")
    serve.set_defaults(handler=cmd_serve)


def parse_bases(values: list[str]) -> dict[str, str]:
    """``ID=PATH`` or ``PATH`` (the id is then the folder name) into {id: path}."""
    from pathlib import Path

    bases = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise TunesmithError(f"--model '{value}' must look like ID=PATH or PATH")
        bases[name] = path
    return bases


def check_start(args: argparse.Namespace, bases: dict[str, str]) -> None:
    """The start-up arguments, checked before the address is printed.

    Raises:
        TunesmithError: For a workspace that is a file or cannot be created, a ``--model`` that is
            neither an alias, a model folder nor a hub id, or a port out of range or in use.
    """
    import socket
    from pathlib import Path

    from tunesmith.models.aliases import ALIASES
    from tunesmith.models.loading import resolve_model_path

    workspace = Path(args.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise TunesmithError(f"--workspace {args.workspace} is a file, not a folder: give a folder (created if missing)")
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TunesmithError(f"--workspace {args.workspace} cannot be created ({error.strerror}): "
                             "give a folder you can write to") from None
    for name, path in bases.items():
        if path not in ALIASES:
            try:
                resolve_model_path(path, Path("."))  # a folder or a hub id: the cache is never touched
            except TunesmithError as error:
                raise TunesmithError(f"--model {name}={path}: {error}") from None
    if not 0 < args.port < 65536:
        raise TunesmithError(f"--port {args.port} is not a port number: give one from 1 to 65535")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's wait is free
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise TunesmithError(f"--port {args.port} on {args.host} cannot be used ({error.strerror}): "
                                 "another server may hold it; pick another port with --port") from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tunesmith.serve.app import create_app, is_loopback
    except ImportError as error:
        raise TunesmithError(f"tunesmith serve needs the serve extra ({error.name} is missing): "
                             "pip install 'tunesmith[serve]'") from None
    if not is_loopback(args.host) and not args.api_key:
        raise TunesmithError(f"--host {args.host} is reachable from other machines: give --api-key KEY as well "
                             "(or bind to 127.0.0.1)")
    bases = parse_bases(args.model)
    check_start(args, bases)
    app = create_app(args.workspace, args.api_key, bases, args.device, args.max_upload_mb,
                     batch_window_ms=args.batch_window_ms, allow_code=args.allow_code,
                     allow_remote_models=args.allow_remote_models, dtype=args.dtype)
    status(f"starting the server on {args.host}:{args.port}, models in {app.state.pool.dtype_reason} ...")
    print(f"tunesmith studio on http://{args.host}:{args.port}/  (workspace {app.state.workspace.root})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
