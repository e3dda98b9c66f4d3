"""A small offline Google Cloud Storage server (the JSON API), for tests of gs:// paths.

Real clients talk to it over HTTP exactly as they talk to storage.googleapis.com: gcsfs (what
`etils.epath` uses for gs:// without TensorFlow) through ``STORAGE_EMULATOR_HOST``,
google-cloud-storage (orbax asks it about the bucket) through the same variable, and
TensorStore's ``gcs`` kvstore driver (orbax writes arrays with it) through
``TENSORSTORE_GCS_HTTP_URL``. So a test of gs:// runs the same code as a job on a real bucket,
with nothing mocked inside the process under test.

What it serves: bucket metadata; object metadata, media reads (byte ranges), media, multipart
and resumable uploads, listing (prefix, delimiter, start/end offsets), delete, copy/rewrite,
batched requests, and the preconditions ``ifGenerationMatch`` / ``ifGenerationNotMatch`` that
TensorStore's OCDBT commits rely on. Objects live in one flat folder per bucket (file name =
the percent-encoded object name), so a test can see exactly what was written.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import http.server
import json
import os
import pathlib
import re
import threading
import time
import urllib.parse
import uuid

_LOCK = threading.RLock()


class FakeGCS:
    """Serves buckets under ``root`` (one folder per bucket) on 127.0.0.1 from a thread."""

    def __init__(self, root: os.PathLike, buckets: tuple[str, ...] = ("bucket",)) -> None:
        self.root = pathlib.Path(root)
        for bucket in buckets:
            (self.root / bucket).mkdir(parents=True, exist_ok=True)
        self._generation = int(time.time() * 1e6)
        self._generations: dict[tuple[str, str], int] = {}
        self._uploads: dict[str, dict] = {}
        self.requests: list[str] = []
        handler = type("Handler", (_Handler,), {"store": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGCS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict[str, str]:
        """Environment variables that point every client at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs and google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore's gcs kvstore
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (offline)
            "GCE_METADATA_HOST": self.url.removeprefix("http://"),  # no metadata server: answered 404 at once
            "GCE_METADATA_ROOT": self.url.removeprefix("http://"),
            "GCE_METADATA_IP": self.url.removeprefix("http://"),
            "GOOGLE_CLOUD_PROJECT": "test",
            # gcsfs >= 2026.10 first asks the gRPC storage-control API whether a bucket is zonal or
            # hierarchical; this server speaks the JSON API only, which a plain bucket is served by.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    # --- storage -------------------------------------------------------------------------------

    def file(self, bucket: str, name: str) -> pathlib.Path:
        return self.root / bucket / urllib.parse.quote(name, safe="")

    def objects(self, bucket: str) -> dict[str, pathlib.Path]:
        folder = self.root / bucket
        return {urllib.parse.unquote(p.name): p for p in folder.iterdir() if not p.name.startswith(".")}

    def generation(self, bucket: str, name: str) -> int | None:
        path = self.file(bucket, name)
        if not path.is_file():
            return None
        return self._generations.setdefault((bucket, name), path.stat().st_mtime_ns // 1000)

    def metadata(self, bucket: str, name: str) -> dict:
        path = self.file(bucket, name)
        data = path.read_bytes()
        generation = self.generation(bucket, name)
        updated = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(path.stat().st_mtime))
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{generation}",
            "name": name,
            "bucket": bucket,
            "generation": str(generation),
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "size": str(len(data)),
            "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": base64.b64encode(_crc32c(data).to_bytes(4, "big")).decode(),
            "timeCreated": updated,
            "updated": updated,
            "storageClass": "STANDARD",
        }

    def write(self, bucket: str, name: str, data: bytes) -> dict:
        path = self.file(bucket, name)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        temp.write_bytes(data)
        os.replace(temp, path)
        self._generation += 1
        self._generations[(bucket, name)] = self._generation
        return self.metadata(bucket, name)

    def delete(self, bucket: str, name: str) -> None:
        self.file(bucket, name).unlink()
        self._generations.pop((bucket, name), None)


def _crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), which clients may check against the object's metadata."""
    try:
        import google_crc32c

        return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")
    except ImportError:  # pragma: no cover - google-crc32c comes with google-cloud-storage
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


class _Reply(Exception):
    def __init__(self, status: int, body: bytes | dict = b"", headers: dict | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, {"error": {"code": status, "message": message, "errors": [{"message": message}]}})


class _Handler(http.server.BaseHTTPRequestHandler):
    store: FakeGCS
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not every request
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionResetError:  # a client (a killed program) went away mid-request
            pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        body = self._body()
        status, payload, headers = self.dispatch(method, self.path, dict(self.headers.items()), body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # a client that read only what it needed
                pass

    def dispatch(self, method: str, target: str, headers: dict, body: bytes) -> tuple[int, bytes, dict]:
        self.store.requests.append(f"{method} {target}")
        try:
            with _LOCK:
                reply = self.route(method, target, {k.lower(): v for k, v in headers.items()}, body)
        except _Reply as r:
            reply = r
        payload = reply.body
        headers = dict(reply.headers)
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json; charset=UTF-8")
        return reply.status, payload, headers

    do_GET = lambda self: self._handle("GET")  # noqa: E731
    do_HEAD = lambda self: self._handle("HEAD")  # noqa: E731
    do_POST = lambda self: self._handle("POST")  # noqa: E731
    do_PUT = lambda self: self._handle("PUT")  # noqa: E731
    do_DELETE = lambda self: self._handle("DELETE")  # noqa: E731
    do_PATCH = lambda self: self._handle("PATCH")  # noqa: E731

    # --- routes ----------------------------------------------------------------------------------

    def route(self, method: str, target: str, headers: dict, body: bytes) -> _Reply:
        url = urllib.parse.urlsplit(target)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path
        if path.startswith("/computeMetadata"):
            raise _error(404, "no metadata server here")
        if path == "/batch/storage/v1":
            return self.batch(headers, body)
        if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
            return self.upload(method, m.group(1), query, headers, body)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)", path):
            return self.bucket(m.group(1))
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
            return self.listing(m.group(1), query)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/(copyTo|rewriteTo)/b/([^/]+)/o/(.+)", path):
            source = urllib.parse.unquote(m.group(2))
            return self.copy(m.group(1), source, m.group(4), urllib.parse.unquote(m.group(5)), m.group(3), query)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/moveTo/o/(.+)", path):  # an atomic rename
            source, dest = urllib.parse.unquote(m.group(2)), urllib.parse.unquote(m.group(3))
            reply = self.copy(m.group(1), source, m.group(1), dest, "copyTo", query)
            self.store.delete(m.group(1), source)
            return reply
        if m := re.fullmatch(r"/(?:download/)?storage/v1/b/([^/]+)/o/(.+)", path):
            name = urllib.parse.unquote(m.group(2))
            if method in ("GET", "HEAD"):
                return self.read(m.group(1), name, query, headers)
            if method == "DELETE":
                return self.remove(m.group(1), name, query)
            if method == "PATCH":
                return _Reply(200, self.store.metadata(m.group(1), name))
        raise _error(404, f"fake GCS: no route for {method} {path}")

    def _check_bucket(self, bucket: str) -> None:
        if not (self.store.root / bucket).is_dir():
            raise _error(404, f"bucket {bucket} not found")

    def bucket(self, bucket: str) -> _Reply:
        self._check_bucket(bucket)
        return _Reply(
            200,
            {
                "kind": "storage#bucket",
                "id": bucket,
                "name": bucket,
                "location": "US",
                "storageClass": "STANDARD",
                "metageneration": "1",
                "hierarchicalNamespace": {"enabled": False},
            },
        )

    def _preconditions(self, bucket: str, name: str, query: dict) -> None:
        current = self.store.generation(bucket, name)
        if "ifGenerationMatch" in query:
            wanted = int(query["ifGenerationMatch"])
            if (current or 0) != wanted:
                raise _error(412, f"{name}: generation {current} != ifGenerationMatch {wanted}")
        if "ifGenerationNotMatch" in query and current is not None and current == int(query["ifGenerationNotMatch"]):
            raise _Reply(304)

    def read(self, bucket: str, name: str, query: dict, headers: dict) -> _Reply:
        self._check_bucket(bucket)
        if self.store.generation(bucket, name) is None:
            raise _error(404, f"object {name} not found")
        self._preconditions(bucket, name, query)
        meta = self.store.metadata(bucket, name)
        extra = {"x-goog-generation": meta["generation"], "x-goog-metageneration": "1"}
        if query.get("alt") != "media":
            return _Reply(200, meta, extra)
        data = self.store.file(bucket, name).read_bytes()
        extra["x-goog-stored-content-length"] = str(len(data))
        extra["Content-Type"] = "application/octet-stream"
        wanted = headers.get("range")
        if not wanted:
            return _Reply(200, data, extra)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        if not m:
            raise _error(400, f"bad range {wanted!r}")
        if m.group(1) == "":
            start, stop = max(len(data) - int(m.group(2)), 0), len(data)
        else:
            start = int(m.group(1))
            stop = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
        if start >= len(data) and len(data) > 0:
            raise _Reply(416, {"error": {"code": 416, "message": "range not satisfiable"}}, extra)
        extra["Content-Range"] = f"bytes {start}-{max(stop - 1, start)}/{len(data)}"
        return _Reply(206, data[start:stop], extra)

    def remove(self, bucket: str, name: str, query: dict) -> _Reply:
        self._check_bucket(bucket)
        if self.store.generation(bucket, name) is None:
            raise _error(404, f"object {name} not found")
        self._preconditions(bucket, name, query)
        self.store.delete(bucket, name)
        return _Reply(204)

    def listing(self, bucket: str, query: dict) -> _Reply:
        self._check_bucket(bucket)
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        items, prefixes = [], set()
        for name in sorted(self.store.objects(bucket)):
            if not name.startswith(prefix) or name < start or (end is not None and end != "" and name >= end):
                continue
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest[: rest.index(delimiter) + len(delimiter)])
                continue
            items.append(self.store.metadata(bucket, name))
        if query.get("includeTrailingDelimiter") == "true":
            items += [self.store.metadata(bucket, p) for p in sorted(prefixes) if self.store.generation(bucket, p)]
        out = {"kind": "storage#objects", "items": items}
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        return _Reply(200, out)

    def copy(self, bucket: str, name: str, dest_bucket: str, dest: str, how: str, query: dict) -> _Reply:
        self._check_bucket(bucket)
        self._check_bucket(dest_bucket)
        if self.store.generation(bucket, name) is None:
            raise _error(404, f"object {name} not found")
        self._preconditions(dest_bucket, dest, query)
        meta = self.store.write(dest_bucket, dest, self.store.file(bucket, name).read_bytes())
        if how == "rewriteTo":
            size = meta["size"]
            return _Reply(200, {"kind": "storage#rewriteResponse", "totalBytesRewritten": size,
                                "objectSize": size, "done": True, "resource": meta})  # fmt: skip
        return _Reply(200, meta)

    def upload(self, method: str, bucket: str, query: dict, headers: dict, body: bytes) -> _Reply:
        self._check_bucket(bucket)
        kind = query.get("uploadType", "media")
        if "upload_id" in query:  # a resumable upload's data
            return self._resumable_chunk(query["upload_id"], headers, body)
        if kind == "media":
            name = query["name"]
            self._preconditions(bucket, name, query)
            return _Reply(200, self.store.write(bucket, name, body))
        if kind == "multipart":
            meta, data = _split_multipart(headers["content-type"], body)
            name = query.get("name") or meta["name"]
            self._preconditions(bucket, name, query)
            return _Reply(200, self.store.write(bucket, name, data))
        if kind == "resumable":
            meta = json.loads(body or b"{}")
            name = query.get("name") or meta["name"]
            self._preconditions(bucket, name, query)
            upload_id = uuid.uuid4().hex
            self.store._uploads[upload_id] = {"bucket": bucket, "name": name, "data": bytearray(), "query": query}
            location = f"{self.store.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return _Reply(200, b"", {"Location": location})
        raise _error(400, f"uploadType {kind!r} not served")

    def _resumable_chunk(self, upload_id: str, headers: dict, body: bytes) -> _Reply:
        upload = self.store._uploads.get(upload_id)
        if upload is None:
            raise _error(404, f"no upload {upload_id}")
        upload["data"] += body
        total = headers.get("content-range", "").rsplit("/", 1)[-1]
        if total != "*" and total != "" and int(total) == len(upload["data"]):
            del self.store._uploads[upload_id]
            return _Reply(200, self.store.write(upload["bucket"], upload["name"], bytes(upload["data"])))
        if total == "" and "content-range" not in headers:  # a single PUT with the whole object
            del self.store._uploads[upload_id]
            return _Reply(200, self.store.write(upload["bucket"], upload["name"], bytes(upload["data"])))
        return _Reply(308, b"", {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {})

    def batch(self, headers: dict, body: bytes) -> _Reply:
        """multipart/mixed of HTTP requests (gcsfs deletes many objects this way)."""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + body
        )
        boundary = "batch_" + uuid.uuid4().hex
        parts = []
        for index, part in enumerate(message.iter_parts()):
            raw = part.get_payload(decode=True) or b""
            head, _, inner_body = raw.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target = lines[0].split(" ")[:2]
            inner_headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            status, payload, reply_headers = self.dispatch(method, target, inner_headers, inner_body)
            content_id = part.get("Content-ID", f"<item{index}>")
            head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in reply_headers.items())
            parts.append(
                f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <response-{content_id.strip('<>')}>"
                f"\r\n\r\n{head}Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
                + b"\r\n"
            )
        out = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return _Reply(200, out, {"Content-Type": f"multipart/mixed; boundary={boundary}"})


def _split_multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
    """(metadata, data) of a multipart/related upload: a JSON part, then the object's bytes."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    pieces = body.split(b"--" + boundary)
    parts = [p for p in pieces[1:] if not p.startswith(b"--")]
    decoded = []
    for part in parts:
        _, _, content = part.partition(b"\r\n\r\n")
        decoded.append(content[:-2] if content.endswith(b"\r\n") else content)
    return json.loads(decoded[0] or b"{}"), decoded[1] if len(decoded) > 1 else b""
