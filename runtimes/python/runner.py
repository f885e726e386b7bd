"""thaw's Python runner: what CPython for WASI runs as its script for a Python function.

`thaw pack handler.py` puts this file at /usr/local/lib/thaw/runner.py, the function's files
at /app, and packs CPython with its start-up up to the first read of stdin as the function's
init (`--init-until-read`). So everything before `_read_request` is captured by `thaw snapshot`:
the interpreter's start-up, this file's imports, and the function module's top level. Every VM
restored from the image continues inside that read, with its own request, and ends with
`os._exit`, which skips the interpreter's teardown (nothing of the VM outlives the request).

The contract (docs/FUNCTIONS.md):
- `handle(request)` gets the request as bytes, or as str when its parameter is annotated `str`;
  it returns str, bytes, None, or anything `json.dumps` takes, which is the response. While it
  runs, `print` goes to stderr, the function's log.
- A module without `handle` is a script: its top level reads stdin and prints its answer.
- An exception fails the request: the traceback goes to stderr and the runner aborts, which
  thaw reports as a failed function (exit code 104).
"""

import importlib.util
import json
import os
import random
import sys
import traceback

ENTRY_VARIABLE = "THAW_PYTHON_ENTRY"


def _fail(message=None):
    """Writes the exception being handled (or `message`) to stderr and aborts: a trap, which
    thaw reports as the function failing. The traceback starts at the function's own code, as
    `python3 handler.py`'s would: the runner's frames and the import machinery's are left out."""
    if message is None:
        kind, error, frames = sys.exc_info()
        while frames is not None and _is_ours(frames.tb_frame.f_code.co_filename):
            frames = frames.tb_next
        traceback.print_exception(kind, error, frames)
    else:
        print(message, file=sys.stderr)
    sys.stderr.flush()
    os.abort()


def _is_ours(file):
    """Whether a frame of `file` is the runner's or Python's import machinery's."""
    return file == __file__ or file.startswith("<frozen importlib")


def _load(entry):
    """Imports the function's module from the file `entry`, named by its stem, with its
    directory first on sys.path so that it imports the files beside it."""
    directory, file = os.path.split(entry)
    name = file[: -len(".py")] if file.endswith(".py") else file
    sys.path.insert(0, directory)
    sys.argv[0] = entry
    spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None:
        _fail(f"thaw: {entry} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _wants_str(handle):
    """Whether `handle` asks for the request as str: its first parameter is annotated `str`."""
    code = getattr(handle, "__code__", None)
    if code is None or code.co_argcount == 0:
        return False
    annotation = getattr(handle, "__annotations__", {}).get(code.co_varnames[0])
    return annotation is str or annotation == "str"


def _encode(result):
    """The response for what `handle` returned."""
    if result is None:
        return b""
    if isinstance(result, str):
        return result.encode("utf-8", "surrogateescape")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    try:
        return json.dumps(result).encode()
    except (TypeError, ValueError) as e:
        _fail(f"thaw: handle returned a value of type {type(result).__name__}, which is neither str, bytes nor JSON: {e}")


def _read_request():
    """The request: all of stdin. The first read is where thaw checkpoints the function."""
    request = sys.stdin.buffer.read()
    # Everything drawn so far is in the image and shared by every VM restored from it: draw
    # `random`'s state again from this VM's own entropy. 32 bytes (hashed with SHA-512 into the
    # generator's key) take one `random_get`; `random.seed()` would take 2,500 bytes in ten.
    random.seed(os.urandom(32))
    return request


def main():
    entry = os.environ.get(ENTRY_VARIABLE)
    if not entry:
        _fail(f"thaw: {ENTRY_VARIABLE} names no module: pack the function with `thaw pack handler.py`")
    try:
        module = _load(entry)
    except SystemExit:
        raise
    except BaseException:
        _fail()
    handle = getattr(module, "handle", None)
    if not callable(handle):
        # A script: its top level read the request and wrote the answer.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    as_str = _wants_str(handle)
    request = _read_request()
    if as_str:
        request = request.decode("utf-8", "replace")
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        response = _encode(handle(request))
    except Exception:
        _fail()
    sys.stdout = stdout
    sys.stderr.flush()
    stdout.buffer.write(response)
    stdout.flush()
    os._exit(0)


main()
