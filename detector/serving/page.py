"""The operators' web page (static/index.html) with a Content-Security-Policy made for it.

The page's script and style are inline; the policy allows exactly those blocks by their
SHA-256, so an injected script (a product name or a review note that slipped past
escaping) would not run, and no other site may frame the page.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

from starlette.responses import HTMLResponse

PAGE_FILE = Path(__file__).parent / "static" / "index.html"


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
        for block in blocks
    )


@functools.cache
def _page() -> tuple[str, str]:
    html = PAGE_FILE.read_text()
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "img-src 'self' blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, policy


def page_response() -> HTMLResponse:
    html, policy = _page()
    headers = {"Content-Security-Policy": policy, "Cache-Control": "no-store"}
    return HTMLResponse(html, headers=headers)
