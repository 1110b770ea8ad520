"""The CLI's page-size options (`--page-size`, `--limit`): AIP-158 as the services apply it
(streammesh.mesh.paging.page_size): 0 asks for the service's default, a size above its maximum
is lowered to it by the service, a negative one is refused here, before any call."""

from __future__ import annotations

import argparse

from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import page_size

__all__ = ["page_size_option"]


def page_size_option(text: str) -> int:
    """argparse `type` of a page-size option: the number as given (the service coerces it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        page_size(value)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(
            f"{error.message}: give 0 for the service's default, or a positive size (one above"
            " the maximum is lowered to it)"
        ) from None
    return value
