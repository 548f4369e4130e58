"""ldm-serve: AUTOMATIC1111's HTTP API and a web page over the default model or a folder of models.

Safe by default: it binds 127.0.0.1; --listen (all interfaces) needs --api-auth USER:PASS (or an
explicit --insecure-no-auth); every request is bounded (body size, pixels, steps, images, queue);
pictures are never fetched from URLs; models are the pipeline folders directly inside --models-dir.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ldm.cli.common import ArgumentParser, run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ldm-serve",
        description="Serve AUTOMATIC1111's HTTP API (/sdapi/v1/...) and a web page at / over ldm's pipeline.",
        epilog="Example: ldm-serve --models-dir ~/models --api-auth alice:secret --listen",
    )
    p.add_argument("--models-dir", type=Path,
                   help="a folder of pipeline folders (diffusers layout), each a model clients may choose; the "
                        "default model is always offered too")
    p.add_argument("--model", help="the model to load first: a folder name in --models-dir (default: the default "
                                   "model)")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="where prompts' <lora:NAME:SCALE> tags (AUTOMATIC1111's) find NAME.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind")
    p.add_argument("--port", type=int, default=7860, help="the port (AUTOMATIC1111's)")
    p.add_argument("--listen", action="store_true", help="bind all interfaces (0.0.0.0); needs --api-auth")
    p.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP basic auth with these credentials")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow --listen without --api-auth")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body, in MB")
    p.add_argument("--max-steps", type=int, default=150, help="most steps one request may ask for")
    p.add_argument("--max-images", type=int, default=16, help="most images (batch_size x n_iter) per request")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024,
                   help="most pixels per image drawn and per picture sent (larger pictures are refused unread)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get a 503")
    p.add_argument("--max-batch", type=int, default=16, help="most images drawn in one pipeline call across requests")
    return p


def model_title(name: str, folder: Path) -> str:
    """A1111's title, "name [hash]": the first 10 hex digits of the SHA-256 of the U-Net's weights."""
    from ldm.models import inspect_pipeline

    info = inspect_pipeline(folder)
    digest = hashlib.sha256()
    for file in sorted({f for f, _ in (info.components["unet"].weights or {}).values()}):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return f"{name} [{digest.hexdigest()[:10]}]"


def find_models(models_dir: Path | None) -> dict[str, Path]:
    """title -> folder: the default model, and every pipeline folder directly inside `models_dir`
    whose real path stays inside it (a link pointing elsewhere is skipped, with a warning)."""
    import warnings

    from ldm.pipeline import DEFAULT_MODEL

    folders = {"default-model": DEFAULT_MODEL} if DEFAULT_MODEL.is_dir() else {}
    if models_dir is not None:
        if not models_dir.is_dir():
            raise ValueError(f"--models-dir {models_dir} is not a folder")
        root = models_dir.resolve()
        for entry in sorted(models_dir.iterdir()):
            if not (entry / "model_index.json").is_file():
                continue
            real = entry.resolve()
            if real.parent != root and root not in real.parents:
                warnings.warn(f"--models-dir: {entry.name} links outside the folder; skipped")
                continue
            folders[entry.name] = real
    if not folders:
        raise ValueError("no model to serve: the default model is missing and --models-dir has no pipeline folders")
    return {model_title(name, folder): folder for name, folder in folders.items()}


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.serve.a1111 import Limits

    auth = None
    if args.api_auth is not None:
        user, sep, password = args.api_auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth takes USER:PASS, both non-empty")
        auth = (user, password)
    host = "0.0.0.0" if args.listen else args.host
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None and not args.insecure_no_auth:
        raise ValueError(f"binding {host} without --api-auth would let anyone on the network use this machine; "
                         "pass --api-auth USER:PASS (or --insecure-no-auth if you mean it)")
    for name in ("max_steps", "max_images", "max_pixels", "max_queue", "max_batch", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("ldm-serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir} is not a folder")
    models = find_models(args.models_dir)
    first = next(iter(models))
    if args.model is not None:
        matches = [t for t in models if t.rsplit(" [", 1)[0] == args.model]
        if not matches:
            names = ", ".join(t.rsplit(" [", 1)[0] for t in models)
            raise ValueError(f"--model {args.model}: not among the models ({names})")
        first = matches[0]
    from ldm.serve.app import ServerConfig, create_app

    config = ServerConfig(models={t: str(f) for t, f in models.items()}, model=first, auth=auth,
                          limits=Limits(args.max_steps, args.max_images, args.max_pixels),
                          max_body=int(args.max_body_mb * 2**20), max_queue=args.max_queue,
                          max_batch=args.max_batch, device=args.device,
                          lora_dir=str(args.lora_dir) if args.lora_dir else None)
    app = create_app(config)
    serve(app, host, args.port)
    return 0


def serve(app, host: str, port: int) -> None:
    """uvicorn, with SIGTERM/SIGINT first answering the queued requests with 503 (the running call
    finishes and is answered), then shutting down as uvicorn does."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker = app.state.worker
            if not worker.stopping.is_set():
                import threading

                threading.Thread(target=worker.stop, daemon=True).start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, less its re-raising of the signal after the shutdown: a clean stop exits 0."""
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # before uvicorn's exit code raises them again

    print(f"ldm-serve: http://{host}:{port}/ (API at /sdapi/v1/); model {app.state.worker.title}", flush=True)
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


def main(argv=None) -> int:
    return run(_main, argv, prog="ldm-serve")


if __name__ == "__main__":
    sys.exit(main())
