"""Locust load test of the inspection API: every response is checked, wrong answers fail.

    export INSPECT_LOAD_TEST_KEY=KEY   # a key with the loadtest role (name=loadtest:KEY)
    locust -f locustfile.py --host http://localhost:3000 --headless -u 16 -r 4 -t 2m
    locust -f locustfile.py --host ... --image-dir /data/samples --api-key KEY
    locust -f locustfile.py --host ... --products carpet,line3-grey   # each request picks one

A key with the loadtest role is scored as the line's are but never recorded, never in a drift
window or flag rate, and counted apart (inspection_load_test_answers_total): the run leaves
the line's review queue and alerts alone. Without --products the users spread over every
product the service serves (GET /products).

Users post images to /inspect, /heatmap and /inspect_batch in a 16 : 3 : 1 mix (operators
mostly need the verdict, sometimes the heatmap; a few clients send several frames at once).
Images come from --image-dir, or are synthetic carpet frames made at start-up.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from locust import HttpUser, between, events, task

from detector.schema import check_answer

IMAGES: list[tuple[str, bytes]] = []


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--image-dir", default="", help="folder of images to send")
    parser.add_argument("--image-count", type=int, default=12, help="synthetic images to make")
    parser.add_argument("--image-size", type=int, default=512, help="synthetic image size")
    parser.add_argument(
        "--api-key",
        default="",
        env_var="INSPECT_LOAD_TEST_KEY",
        help="sent as X-API-Key (a loadtest key keeps the run out of records and drift)",
    )
    parser.add_argument(
        "--products", default="", help="comma-separated products; each request names one"
    )


@events.test_start.add_listener
def load_images(environment, **_) -> None:
    options = environment.parsed_options
    if IMAGES:
        return
    if options.image_dir:
        from detector.images import is_image_path

        for path in sorted(Path(options.image_dir).rglob("*")):
            if path.is_file() and is_image_path(path):
                IMAGES.append((path.name, path.read_bytes()))
    else:
        import numpy as np
        from PIL import Image

        from detector.data.synthetic import carpet_texture

        rng = np.random.default_rng(0)
        for index in range(options.image_count):
            buffer = io.BytesIO()
            texture = carpet_texture(options.image_size, rng)
            Image.fromarray((texture * 255).astype(np.uint8)).save(buffer, "PNG", compress_level=1)
            IMAGES.append((f"synthetic-{index}.png", buffer.getvalue()))
    if not IMAGES:
        raise SystemExit(f"no images found in {options.image_dir}")
    if not options.products:
        options.products = ",".join(served_products(environment.host, options.api_key))


def served_products(host: str, key: str) -> list[str]:
    """Every product the service serves; none when it answers without naming them (one
    product: requests may leave it out)."""
    import httpx

    headers = {"X-API-Key": key} if key else {}
    answer = httpx.get(f"{host.rstrip('/')}/products", headers=headers, timeout=30)
    if answer.status_code != 200:
        raise SystemExit(f"GET /products answered {answer.status_code}: {answer.text[:200]}")
    names = [entry["name"] for entry in answer.json()]
    return names if len(names) > 1 else []


# Every answer is checked against the one result schema (detector/schema.py).
check_result = check_answer


class InspectionUser(HttpUser):
    pause = between(0.0, 0.2)
    retry_after = 0.0  # set by a 503: the next wait, as a well-behaved client waits

    def wait_time(self) -> float:
        wait, self.retry_after = self.retry_after, 0.0
        return wait or self.pause()

    def overloaded(self, response) -> bool:
        """A 503 with Retry-After is the service's right answer to more load than it takes:
        it is reported under its own name ("<endpoint> (503 overloaded)"), so the endpoint's
        own row keeps the latency of accepted requests only, and this user waits as asked.
        Any other non-200 is a failure."""
        retry_after = response.headers.get("retry-after", "")
        if response.status_code != 503 or not retry_after.isdigit():
            return False
        response.request_meta["name"] = f"{response.request_meta['name']} (503 overloaded)"
        response.success()
        self.retry_after = float(retry_after)
        return True

    def on_start(self) -> None:
        key = self.environment.parsed_options.api_key
        if key:
            self.client.headers["X-API-Key"] = key

    def _upload(self) -> dict:
        name, data = random.choice(IMAGES)
        return {"image": (name, data, "application/octet-stream")}

    def _form(self) -> dict:
        """The product field, when the service serves several (else it may be left out)."""
        products = [p for p in self.environment.parsed_options.products.split(",") if p]
        return {"product": random.choice(products)} if products else {}

    @task(16)
    def inspect(self) -> None:
        with self.client.post(
            "/inspect", files=self._upload(), data=self._form(), catch_response=True
        ) as response:
            if self.overloaded(response):
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif problem := check_result(response.json()):
                response.failure(problem)

    @task(3)
    def heatmap(self) -> None:
        with self.client.post(
            "/heatmap", files=self._upload(), data=self._form(), catch_response=True
        ) as response:
            if self.overloaded(response):
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.content.startswith(b"\x89PNG\r\n\x1a\n"):
                response.failure("heatmap is not a PNG")
            elif "x-anomaly-score" not in response.headers:
                response.failure("heatmap lacks the X-Anomaly-Score header")

    @task(1)
    def inspect_batch(self) -> None:
        uploads = [("images", random.choice(IMAGES)) for _ in range(3)]
        files = [
            (field, (name, data, "application/octet-stream")) for field, (name, data) in uploads
        ]
        with self.client.post(
            "/inspect_batch",
            files=files,
            data=self._form(),
            catch_response=True,
            name="/inspect_batch",
        ) as response:
            if self.overloaded(response):
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            results = response.json()
            if len(results) != 3:
                response.failure(f"expected 3 results, got {len(results)}")
            elif problem := next(filter(None, map(check_result, results)), None):
                response.failure(problem)
