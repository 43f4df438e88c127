"""The .txt convention, importable without torch: tokenizing worker processes start in a fraction of a second."""

from lm.errors import UsageError


def split_lines(raw: str) -> list[str]:
    """Split on '\\n' (and '\\r\\n'), each line keeping its line break; a last line without one is kept."""
    lines = raw.replace("\r\n", "\n").split("\n")
    texts = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        texts.append(lines[-1])
    return texts


def not_utf8(path: str, byte: int) -> UsageError:
    return UsageError(f"{path}: not UTF-8 text (byte {byte}); convert it, e.g. with iconv -t utf-8")
