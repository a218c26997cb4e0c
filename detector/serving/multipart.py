"""A multipart body's part headers, read as the body streams past the gate: every part named
as BentoML (Starlette) will name it, file fields files, no undeclared field, at most the
route's number of files."""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from detector.serving.answers import Refusal
from detector.serving.route_rules import Rule


def media_type(value: str) -> str:
    return parse_options_header(value)[0].decode("latin-1").lower()


class MultipartShape:
    """Reads part headers as a multipart body streams past; keeps no part data.

    It must see every part exactly as BentoML's parser (Starlette's) will: header names and
    values are gathered across chunks, and field names are decoded as Starlette decodes
    them. A charset other than UTF-8 on the body is refused outright, so no part can be
    named one way here and another way there.
    """

    def __init__(self, content_type: str, rule: Rule) -> None:
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or b"boundary" not in options:
            raise Refusal(
                415,
                "not_multipart",
                "Send the image as a multipart/form-data file upload.",
            )
        charset = options.get(b"charset", b"utf-8").decode("latin-1").lower()
        if charset.replace("-", "").replace("_", "") not in ("utf8", "usascii", "ascii"):
            raise Refusal(415, "bad_charset", "Multipart bodies are read as UTF-8 only.")
        self.rule = rule
        self.files = 0
        self._name, self._value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        callbacks = {
            "on_header_field": self._on_field,
            "on_header_value": self._on_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self.parser = MultipartParser(options[b"boundary"], callbacks)

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._headers = {}
        field = decoded_name(options.get(b"name", b""))
        is_file = b"filename" in options
        if field in self.rule.file_fields:
            if not is_file:
                raise Refusal(
                    400,
                    "not_a_file",
                    f"Field '{field}' must be a file upload; URLs and text are not fetched.",
                )
        elif field not in self.rule.text_fields:
            known = ", ".join(sorted(self.rule.file_fields | self.rule.text_fields))
            raise Refusal(400, "unknown_field", f"Unknown field {field[:40]!r}; fields: {known}.")
        elif is_file:
            raise Refusal(400, "not_text", f"Field '{field}' must be text, not a file.")
        if is_file:
            self.files += 1
        if self.rule.max_files is not None and self.files > self.rule.max_files:
            raise Refusal(
                413,
                "too_many_files",
                f"At most {self.rule.max_files} images per request.",
            )

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except Refusal:
            raise
        except Exception as error:  # the parser's own errors: a malformed body
            raise Refusal(400, "bad_multipart", f"Malformed multipart: {error}") from None


def decoded_name(name: bytes) -> str:
    """A part's name as Starlette decodes it (UTF-8, else Latin-1)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name.decode("latin-1")
