"""The command-line convention of every entry point, scripts/ included (not training's absl flags).

- argparse, with multi-word flags spelled with dashes (`--batch-size`); the underscore spelling
  (`--batch_size`) is accepted too, so older commands keep working;
- the model is named by `--arch` (summary also takes it as its first argument; the benchmarks
  keep `--model` as an alias);
- any bad input, usage errors included, is one `error:` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the project's flag spellings and one-line errors."""

  def __init__(self, *args: Any, **kwargs: Any):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
    spellings = list(names)
    for name in names:
      if name.startswith('--') and ('-' in name[2:] or '_' in name[2:]):
        for other in (name[:2] + name[2:].replace('_', '-'), name[:2] + name[2:].replace('-', '_')):
          if other not in spellings:
            spellings.append(other)
    if len(spellings) > len(names) and 'dest' not in kwargs:
      kwargs['dest'] = names[0].lstrip('-').replace('-', '_')
    return super().add_argument(*spellings, **kwargs)

  def parse_args(self, *args: Any, **kwargs: Any) -> argparse.Namespace:
    """Also marks absl's flags parsed (their defaults): Grain's worker processes read them, and an
    argparse entry point with `data.num_workers > 0` would otherwise fail in the workers."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return super().parse_args(*args, **kwargs)

  def format_help(self) -> str:
    # The dashed spelling first: it is the documented one.
    for action in self._actions:
      action.option_strings[:] = sorted(action.option_strings, key=lambda s: '_' in s)
    return super().format_help()

  def error(self, message: str) -> NoReturn:
    fail(f'{message} (see {self.prog} --help)')


def positive_int(text: str) -> int:
  """argparse `type` of sizes and counts: 0 or a negative number is bad input, not a default."""
  return _int_at_least(text, 1, 'a positive integer')


def non_negative_int(text: str) -> int:
  """argparse `type` of counts where 0 means 'no limit': a negative one is bad input."""
  return _int_at_least(text, 0, 'an integer >= 0')


def positive_float(text: str) -> float:
  """argparse `type` of rates such as a peak TFLOP/s: 0, a negative, nan or inf is bad input."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not value > 0 or math.isinf(value):
    raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}')
  return value


def _int_at_least(text: str, low: int, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = low - 1
  if value < low:
    raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
  return value


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first non-empty line of an error (JAX's and gloo's run to pages), at most `limit` chars."""
  return next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)[:limit]


def fail(message: Any) -> NoReturn:
  """Bad input: one `error:` line, exit status 1."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)
