"""Reading the text files users hand over (SQuAD JSON, GLUE TSV): UTF-8, and an error that names the file.

Python's own decode error says neither the file nor the line ("'utf-8' codec can't decode byte 0xe9 in
position 1183"); a GLUE or SQuAD file saved as Latin-1 by a spreadsheet is common enough to deserve one line
that says where and what to do.
"""

from __future__ import annotations


def read_utf8_text(path: str, what: str) -> str:
    """The text of the UTF-8 file ``path`` (a byte-order mark is dropped). A missing file is a
    ``FileNotFoundError`` and any other encoding a ``ValueError``, each one line naming ``what`` and the file
    (and the line of the first byte that is not UTF-8)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: the {what} file is not UTF-8 text (byte 0x{raw[err.start]:02x}); save it "
                         "as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
