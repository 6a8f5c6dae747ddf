"""``serve-apps``: the command line of the project (console script).

    serve-apps batch submit input.jsonl --endpoint /v1/detect --wait
    serve-apps batch status BATCH_ID [--wait]
    serve-apps batch results BATCH_ID [--errors] [-o out.jsonl]
    serve-apps batch cancel BATCH_ID
    serve-apps batch list
    serve-apps batch images FOLDER -o input.jsonl --endpoint /v1/detect --categories text
    serve-apps batch images FOLDER -o input.jsonl --prompt "Extract the text" --model M

The server is ``--base-url`` (default ``$SERVE_APPS_URL``, else http://127.0.0.1:8000);
``--api-key`` (default ``$OPENAI_API_KEY``) is sent as a bearer token when set. ``--wait``
shows a progress bar (done / total, rate, ETA) until the batch ends. ``images`` turns a
folder of images (and PDF pages, when pypdfium2 is installed) into batch input lines,
one per image, with the image inline (base64).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled", "expired")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout)


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"error: HTTP {response.status_code}: {message}")
    return response.json()


def _done(batch: dict[str, Any]) -> int:
    counts = batch["request_counts"]
    return int(counts["completed"]) + int(counts["failed"])


def wait(
    client: httpx.Client, batch: dict[str, Any], interval: float, quiet: bool
) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar (done / total, rate, ETA)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as progress:
        task = progress.add_task(batch["status"], total=None, rate="")
        started, first_done = time.monotonic(), _done(batch)
        while batch["status"] not in TERMINAL:
            time.sleep(interval)
            batch = _checked(client.get(f"/v1/batches/{batch['id']}"))
            total = batch["request_counts"]["total"] or None
            done = _done(batch)
            rate = (done - first_done) / max(time.monotonic() - started, 1e-9)
            progress.update(
                task,
                description=batch["status"],
                total=total,
                completed=done,
                rate=f"{rate:.1f} lines/s",
            )
    return batch


def _summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    line = (
        f"{batch['id']} {batch['status']}: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}"
    )
    for error in (batch.get("errors") or {}).get("data", []):
        line += f"\n  {error.get('message')}"
    return line


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = Path(args.file)
        with path.open("rb") as f:
            uploaded = _checked(
                client.post(
                    "/v1/files",
                    files={"file": (path.name, f, "application/jsonl")},
                    data={"purpose": "batch"},
                )
            )
        body: dict[str, Any] = {
            "input_file_id": uploaded["id"],
            "endpoint": args.endpoint,
            "completion_window": "24h",
        }
        if args.metadata:
            body["metadata"] = dict(item.split("=", 1) for item in args.metadata)
        if args.webhook_url:
            body["webhook_url"] = args.webhook_url
        batch = _checked(client.post("/v1/batches", json=body))
        print(batch["id"])
        if args.wait:
            batch = wait(client, batch, args.interval, args.quiet)
            print(_summary(batch))
            return 0 if batch["status"] == "completed" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        batch = _checked(client.get(f"/v1/batches/{args.batch_id}"))
        if args.wait:
            batch = wait(client, batch, args.interval, args.quiet)
        if args.json:
            print(json.dumps(batch, indent=2))
        else:
            print(_summary(batch))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        batch = _checked(client.get(f"/v1/batches/{args.batch_id}"))
        file_id = batch["error_file_id" if args.errors else "output_file_id"]
        if not file_id:
            kind = "error" if args.errors else "output"
            print(f"{batch['id']} ({batch['status']}) has no {kind} file", file=sys.stderr)
            return 1
        response = client.get(f"/v1/files/{file_id}/content")
        if response.status_code >= 400:
            _checked(response)
        if args.output:
            Path(args.output).write_bytes(response.content)
        else:
            sys.stdout.write(response.text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_summary(_checked(client.post(f"/v1/batches/{args.batch_id}/cancel"))))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for batch in _checked(client.get("/v1/batches", params={"limit": args.limit}))["data"]:
            print(_summary(batch))
    return 0


def _pages(path: Path) -> list[tuple[str, bytes]]:
    """(name, PNG/JPEG bytes) of an image file, or of every page of a PDF."""
    if path.suffix.lower() != ".pdf":
        return [(path.name, path.read_bytes())]
    try:
        import pypdfium2
    except ImportError as e:
        raise SystemExit(
            f"{path}: rendering PDF pages needs pypdfium2 (pip install pypdfium2)"
        ) from e
    import io

    pages = []
    pdf = pypdfium2.PdfDocument(str(path))
    for number in range(len(pdf)):
        out = io.BytesIO()
        pdf[number].render(scale=2).to_pil().save(out, format="PNG")
        pages.append((f"{path.name}#page={number + 1}", out.getvalue()))
    return pages


def image_lines(
    folder: Path,
    endpoint: str,
    *,
    categories: list[str] | None,
    prompt: str | None,
    model: str | None,
    max_tokens: int | None,
) -> list[dict[str, Any]]:
    """One batch input line per image of ``folder`` (sorted; PDFs give one per page)."""
    lines = []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ".pdf"))
    for path in files:
        for name, data in _pages(path):
            mime = (
                "image/png"
                if "#page=" in name
                else (mimetypes.guess_type(path.name)[0] or "image/png")
            )
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            body: dict[str, Any]
            if endpoint == "/v1/chat/completions":
                content = [
                    {"type": "text", "text": prompt or "Extract the text of this page."},
                    {"type": "image_url", "image_url": {"url": url}},
                ]
                body = {"messages": [{"role": "user", "content": content}], "temperature": 0}
                if model:
                    body["model"] = model
            else:
                body = {"image": url}
                if endpoint in ("/v1/detect", "/v1/segment"):
                    body["categories"] = categories or ["text"]
                elif endpoint == "/v1/ground":
                    body["caption"] = prompt or ""
            if max_tokens:
                body["max_tokens"] = max_tokens
            lines.append({"custom_id": name, "method": "POST", "url": endpoint, "body": body})
    return lines


def cmd_images(args: argparse.Namespace) -> int:
    lines = image_lines(
        Path(args.folder),
        args.endpoint,
        categories=args.categories,
        prompt=args.prompt,
        model=args.model,
        max_tokens=args.max_tokens,
    )
    if not lines:
        raise SystemExit(f"no images in {args.folder}")
    with open(args.output, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"{len(lines)} lines -> {args.output}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="serve-apps")
    commands = top.add_subparsers(dest="command", required=True)
    batch = commands.add_parser("batch", help="the Batch API: submit, follow, fetch, cancel")
    sub = batch.add_subparsers(dest="action", required=True)

    def server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--base-url", default=os.environ.get("SERVE_APPS_URL", "http://127.0.0.1:8000")
        )
        p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
        p.add_argument("--timeout", type=float, default=60.0)
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true", help="follow it with a progress bar")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = server(sub.add_parser("submit", help="upload a JSONL file and start a batch"))
    p.add_argument("file")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    p.add_argument("--webhook-url")
    waiting(p)
    p.set_defaults(run=cmd_submit)
    p = server(sub.add_parser("status", help="a batch's status and counts"))
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    waiting(p)
    p.set_defaults(run=cmd_status)
    p = server(sub.add_parser("results", help="a batch's output (or error) file"))
    p.add_argument("batch_id")
    p.add_argument("--errors", action="store_true", help="the error file instead")
    p.add_argument("-o", "--output")
    p.set_defaults(run=cmd_results)
    p = server(sub.add_parser("cancel", help="cancel a batch"))
    p.add_argument("batch_id")
    p.set_defaults(run=cmd_cancel)
    p = server(sub.add_parser("list", help="recent batches"))
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("images", help="a folder of images (or PDFs) -> a batch input file")
    p.add_argument("folder")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--endpoint",
        default="/v1/chat/completions",
        choices=["/v1/chat/completions", "/v1/detect", "/v1/segment", "/v1/ground"],
    )
    p.add_argument("--categories", nargs="+")
    p.add_argument("--prompt")
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int)
    p.set_defaults(run=cmd_images)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
