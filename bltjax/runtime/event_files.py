"""TensorBoard event files on any `etils.epath` URI (gs://, s3://, ...), through the same client as every other file.

tensorboardX brings its own writers for s3:// (boto3) and gs:// (google-cloud-storage, whose
``__del__`` uploads once more, and retries for minutes once the bucket is out of reach, e.g. at
the exit of a process whose storage went away). `register` replaces the one of a URI's scheme
with a writer that goes through `bltjax.runtime.paths`, so a run folder in a bucket needs one
client and one set of credentials for all its files. Object stores cannot append: each flush
uploads the whole file in one request (`write_atomic`), which suits event files of scalars
written every few steps.
"""

from __future__ import annotations

import io

from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic


class EpathRecordWriter:
    """The file object tensorboardX's RecordWriter writes to: buffered, uploaded whole on flush."""

    def __init__(self, path: str) -> None:
        self.path = paths.resolve(path)
        self.buffer = io.BytesIO()
        self.uploaded = 0  # bytes of the buffer already in the object
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        if self.buffer.tell() != self.uploaded:
            write_atomic(self.path, self.buffer.getvalue())
            self.uploaded = self.buffer.tell()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class EpathRecordWriterFactory:
    """What tensorboardX's `register_writer_factory` takes: opens writers, checks log folders."""

    def open(self, path: str) -> EpathRecordWriter:
        return EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        """Nothing to do: an object store has no folders to create before the objects in them."""


def register(uri: str) -> None:
    """Routes tensorboardX's event files for ``uri``'s scheme through epath (idempotent)."""
    from tensorboardX import record_writer

    scheme = uri.split("://", 1)[0]  # tensorboardX picks a factory by the text before the first ':'
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), EpathRecordWriterFactory):
        record_writer.register_writer_factory(scheme, EpathRecordWriterFactory())
