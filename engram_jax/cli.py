"""What every entry point shares: bad input is reported in one line, never a traceback.

`run(main)` stands in for `absl.app.run(main)` in experiments/*.py:
  * a flag that cannot be parsed (an unknown config key such as `--config.train.foo=1`, a value
    of the wrong type, a config file that is missing or whose `get_config` refuses its own
    values) prints one line that names the flag or the full key path and exits with status 1
    before `main` runs;
  * `experiment_config.ConfigError` (a field out of its range, a missing data file),
    `FileNotFoundError` and the workdir and checkpoint refusals (`USER_ERRORS`) raised by `main`
    print their message as one line and exit with status 1.
    Entry points validate the config before they create the workdir, so a refused run leaves
    nothing behind.
Every other exception keeps its traceback: it is a bug, not bad input.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags

from engram_jax import checkpoint
from engram_jax import experiment_config
from engram_jax import workdir

USER_ERRORS = (experiment_config.ConfigError, FileNotFoundError,
               # A workdir another trainer holds, a refused resume, a damaged or non-finite
               # checkpoint (engram_jax/workdir.py, checkpoint.py), a diverged run.
               workdir.WorkdirLockedError, workdir.ConfigChangedError,
               checkpoint.FingerprintMismatchError, checkpoint.CheckpointDamagedError,
               checkpoint.CheckpointRestoreError, checkpoint.NonFiniteStateError)


def fail(message: str) -> None:
  """Prints `message` as one line on stderr and exits with status 1."""
  sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
  sys.stderr.flush()
  sys.exit(1)


def _innermost(error: BaseException, kind) -> Optional[BaseException]:
  """The deepest exception of type `kind` in the chain of causes and contexts of `error`.

  ml_collections re-raises a failed `get_config` as the same type with the traceback in its
  message, and absl wraps that in IllegalFlagValueError: the deepest one holds the original
  one-line message."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, kind):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _config_argument(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=VALUE` or `--name VALUE` in argv."""
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{re.escape(name)}(?:=(.*))?$", arg)
    if m:
      return m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                         else None)
  return None


def unknown_override(argv: Sequence[str], flag_values=flags.FLAGS) -> Optional[str]:
  """One line naming the first `--<config flag>.<path>` of argv whose path is not a field of
  that config (the config file is loaded again to look), or None."""
  for name in flag_values:
    flag = flag_values[name]
    if not config_flags.is_config_flag(flag):
      continue
    paths = [m.group(1) for m in (re.match(rf"^--?{re.escape(flag.name)}\.([^=]+)", a)
                                  for a in argv) if m]
    source = _config_argument(argv, flag.name)
    if not paths or source is None:
      continue
    try:
      config = flag.parser.parse(source)
    except Exception:  # pylint: disable=broad-except  # the caller reports the original error
      return None
    if not isinstance(config, ml_collections.ConfigDict):  # not loadable: reported elsewhere
      return None
    for path in paths:
      problem = experiment_config.unknown_key(config, path)
      if problem is not None:
        return f"--{flag.name}.{path}: {problem}"
  return None


def _load_error(error: OSError) -> str:
  # The loader's message lists the paths it tried; its last line says why each failed.
  cause = _innermost(error, OSError)
  lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
  return f"cannot load the config file: {lines[-1] if lines else cause}"


def _unloadable_config(flag_values=flags.FLAGS) -> Optional[str]:
  """One line for a config flag whose file could not be loaded, or None. ml_collections defers
  that error to the first access of the config, which would be a traceback inside `main`."""
  for name in flag_values:
    flag = flag_values[name]
    if not config_flags.is_config_flag(flag) or flag.value is None:
      continue
    try:
      flag.value.keys()  # raises the loader's OSError if the file could not be loaded
    except OSError as e:
      return f"--{flag.name}: {_load_error(e)}"
    except AttributeError:  # a config object without keys(): nothing to check
      continue
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with every failure reported in one line (see the module docstring)."""
  try:
    args = flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    config_error = _innermost(e, experiment_config.ConfigError)
    if config_error is not None:
      fail(str(config_error))
    unknown = unknown_override(argv)
    if unknown is not None:
      fail(unknown)
    load_error = _innermost(e, OSError)
    if load_error is not None:
      fail(_load_error(load_error))
    if isinstance(e, flags.Error):
      lines = [l for l in str(e).splitlines() if l.strip()]
      # A traceback quoted in the message ends with the line that says what went wrong.
      fail(lines[-1] if len(lines) > 1 else str(e))
    raise
  unloadable = _unloadable_config()
  if unloadable is not None:
    fail(unloadable)
  return args


def one_line_errors(main: Callable) -> Callable:
  """`main` with USER_ERRORS printed as one line (exit status 1) instead of a traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(str(e))
  return wrapped


def run(main: Callable) -> None:
  """`absl.app.run(main)` with one-line errors for bad flags, configs and files."""
  app.run(one_line_errors(main), flags_parser=parse_flags)
