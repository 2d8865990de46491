"""A stand-in for Cloud Storage (the JSON API) over a local directory: object
`gs://BUCKET/NAME` is the file ROOT/BUCKET/NAME.

It answers what the slice's agent (uploads, deletes) and `gcloud storage cat`
and `ls` (object metadata, downloads, lists) ask:

    POST   /upload/storage/v1/b/B/o?uploadType=media&name=N
    GET    /storage/v1/b/B/o/N[?alt=media]     /download/storage/v1/b/B/o/N?alt=media
    GET    /storage/v1/b/B/o?prefix=P[&delimiter=/]
    DELETE /storage/v1/b/B/o/N
    GET    /storage/v1/b/B
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from urllib.parse import quote, unquote

from cloud.rehearsal.server import Answer, Request, json_answer


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum Cloud Storage reports."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class Storage:
    """Buckets under `root`; every bucket exists (made on first write)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, bucket: str, name: str) -> Path:
        target = (self.root / bucket / name).resolve()
        if self.root.resolve() not in target.parents:
            raise Answer(400, "INVALID_ARGUMENT", f"bad object name {name!r}")
        return target

    def handles(self, path: str) -> bool:
        return path.split("/")[1:3] in (
            ["storage", "v1"],
            ["upload", "storage"],
            ["download", "storage"],
        )

    def answer(self, request: Request, base: str):
        parts = request.path.strip("/").split("/")
        upload = parts[0] == "upload"
        rest = parts[3:] if parts[0] in ("upload", "download") else parts[2:]
        if len(rest) < 2 or rest[0] != "b":
            raise Answer(404, "NOT_FOUND", f"no such storage API: {request.path}")
        bucket = rest[1]
        if len(rest) == 2:
            return json_answer({"kind": "storage#bucket", "name": bucket, "id": bucket})
        name = unquote("/".join(rest[3:])) if len(rest) > 3 else ""
        if upload and request.method == "POST":
            name = request.arg("name")
            if request.arg("uploadType") != "media" or not name:
                raise Answer(400, "INVALID_ARGUMENT", "only uploadType=media")
            target = self.path(bucket, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            partial.write_bytes(request.raw)
            partial.replace(target)
            return json_answer(self._object(bucket, name, base))
        if request.method == "GET" and not name:
            return json_answer(self._list(bucket, request, base))
        target = self.path(bucket, name)
        if not target.is_file():
            raise Answer(404, "NOT_FOUND", f"No such object: {bucket}/{name}")
        if request.method == "DELETE":
            target.unlink()
            return 204, {}, b""
        if request.arg("alt") == "media" or parts[0] == "download":
            return (
                200,
                {"Content-Type": "application/octet-stream"},
                target.read_bytes(),
            )
        return json_answer(self._object(bucket, name, base))

    def _object(self, bucket: str, name: str, base: str) -> dict:
        data = self.path(bucket, name).read_bytes()
        stamp = str(int(self.path(bucket, name).stat().st_mtime_ns // 1000))
        quoted = quote(name, safe="")
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{stamp}",
            "name": name,
            "bucket": bucket,
            "size": str(len(data)),
            "generation": stamp,
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": base64.b64encode(crc32c(data).to_bytes(4, "big")).decode(),
            "timeCreated": "2026-01-01T00:00:00.000Z",
            "updated": "2026-01-01T00:00:00.000Z",
            "selfLink": f"{base}storage/v1/b/{bucket}/o/{quoted}",
            "mediaLink": f"{base}download/storage/v1/b/{bucket}/o/{quoted}"
            f"?generation={stamp}&alt=media",
        }

    def _list(self, bucket: str, request: Request, base: str) -> dict:
        prefix, delimiter = request.arg("prefix"), request.arg("delimiter")
        top = self.root / bucket
        names = sorted(
            p.relative_to(top).as_posix()
            for p in (top.rglob("*") if top.is_dir() else [])
            if p.is_file() and not p.name.startswith(".")
        )
        items, prefixes = [], set()
        for name in names:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
            else:
                items.append(self._object(bucket, name, base))
        answer = {"kind": "storage#objects", "items": items}
        if prefixes:
            answer["prefixes"] = sorted(prefixes)
        return answer
