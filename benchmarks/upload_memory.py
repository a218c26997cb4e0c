"""API worker RSS while 1 GiB uploads are refused: without a key, declared too large, and
streamed (chunked) past the limit.

    python -m benchmarks.upload_memory [--mib 1024]

Serves a tiny random backbone with INSPECT_API_KEY set and prints, per upload, the answer's
status, how long it took, and the API worker's peak RSS above its RSS before the upload.
It runs on checkouts from this commit's layout on (devtools/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.heatmap_memory import peak_during, server_processes, tiny_store
from devtools.local_server import bentoml_serve

KEY = "benchmark-key"
PREAMBLE = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def body(mib: int) -> Iterator[bytes]:
    yield PREAMBLE
    block = b"\0" * (1 << 20)
    for _ in range(mib):
        yield block
    yield b"\r\n--x--\r\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    length = str(len(PREAMBLE) + (args.mib << 20) + len(b"\r\n--x--\r\n"))
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    cases = {
        "no key, Content-Length": {**multipart, "Content-Length": length},
        "key, Content-Length": {**multipart, "Content-Length": length, "X-API-Key": KEY},
        "key, chunked (no length)": {**multipart, "X-API-Key": KEY},
    }
    results: dict = {"upload_mib": args.mib}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        home = tiny_store(scratch)
        for name, headers in cases.items():
            with bentoml_serve(home, scratch / "serve.log", INSPECT_API_KEY=KEY) as url:
                api = {"api": server_processes(int(url.rsplit(":", 1)[1]))["api"]}
                started = time.perf_counter()

                def upload(url=url, headers=headers) -> int:
                    response = httpx.post(
                        f"{url}/inspect", content=body(args.mib), headers=headers, timeout=900
                    )
                    return response.status_code

                peaks, status = peak_during(api, upload)
                results[name] = {
                    "status": status,
                    "seconds": round(time.perf_counter() - started, 1),
                    "api_peak_above_idle_mib": peaks["api"],
                }
    print("RESULTS " + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
