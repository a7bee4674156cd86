"""Shared CLI plumbing: one clear error line and a non-zero exit instead of a traceback."""
from __future__ import annotations

import functools
import os
import sys

import click

from .. import settings
from ..errors import ReftError


def friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ReftError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except BrokenPipeError:
            os._exit(0)
        except Exception as e:  # a bug; keep the traceback available on request
            if settings.debug():
                raise
            click.echo(f"error: internal error: {type(e).__name__}: {e} (set REFT_DEBUG=1 for a traceback)",
                       err=True)
            sys.exit(2)
    return wrapper


def show_progress() -> bool:
    return sys.stderr.isatty()
