"""What a person sees while a command works: our status lines at a chosen level, the libraries'
chatter below it, and progress that stays one line on a terminal and becomes periodic lines in a log.

Levels (`--log-level`, `-q` = warning, `-v` = debug):
    debug    everything, library warnings and Polygraphy's own verdict lines included
    info     our status lines and progress (default); libraries only at error
    warning  our warnings and errors; no status lines, no progress
    error    errors only
Results (tables, answers, the final line) are printed by the CLI at every level.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
DEFAULT_LEVEL = "info"
#: in a log (stderr not a terminal), a progress line at most this often, plus the last one
LOG_INTERVAL_S = 10.0

logger = logging.getLogger("capa_export")
_state = {"level": logging.INFO, "configured": False}


def _library_loggers() -> list[str]:
    return ["transformers", "torch", "torch.onnx", "onnxscript", "onnx_ir", "huggingface_hub", "PIL", "matplotlib",
            "urllib3", "filelock", "py.warnings"]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (not when configured): a caller
    that redirects stderr later (a test, a notebook) still gets the lines."""

    def __init__(self, stream=None):
        self._fixed = stream
        super().__init__(stream)

    @property
    def stream(self):
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(level: str = DEFAULT_LEVEL, stream=None) -> None:
    """Our logger at `level` on stderr (message only); every library one step quieter: their
    warnings only under debug. Python warnings go through logging ("py.warnings") so they follow
    the same rule."""
    if level not in LEVELS:
        from .errors import CapaError

        raise CapaError(f"--log-level {level!r} is not one of {', '.join(LEVELS)}")
    numeric = LEVELS[level]
    _state.update(level=numeric, configured=True)
    logger.setLevel(numeric)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _StderrHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)

    library_level = logging.WARNING if numeric <= logging.DEBUG else logging.ERROR
    logging.captureWarnings(True)
    if numeric <= logging.DEBUG:
        warnings.simplefilter("default")
    for name in _library_loggers():
        logging.getLogger(name).setLevel(library_level)
    root = logging.getLogger()
    if not root.handlers:  # library records that pass their level still reach stderr, one line each
        library_handler = _StderrHandler(stream)
        library_handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        root.addHandler(library_handler)
    try:  # transformers keeps its own verbosity (and TRANSFORMERS_VERBOSITY); set it directly
        import transformers

        transformers.logging.set_verbosity(library_level)
        if numeric > logging.DEBUG:
            transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:  # ONNX Runtime's C++ logger: 0 verbose .. 3 error
        import onnxruntime

        onnxruntime.set_default_logger_severity(0 if numeric <= logging.DEBUG else 3)
    except ImportError:  # pragma: no cover - a dependency
        pass


def level() -> int:
    return _state["level"]


def info(message: str) -> None:
    """A status line (e.g. "[2/4] exporting ONNX ..."): shown at info and debug."""
    if _state["configured"]:
        logger.info(message)
    else:  # a library user who never configured logging still sees the steps, as before
        print(message, file=sys.stderr)


def progress_shown(requested: bool = True) -> bool:
    return requested and _state["level"] <= logging.INFO


@contextlib.contextmanager
def polygraphy_verdicts_hidden():
    """Polygraphy's Comparator logs its own PASSED/FAILED lines with its default tolerances
    (rel=1e-5, abs=1e-5): below debug they are hidden, and the caller prints its verdict with ours."""
    from polygraphy.logger import G_LOGGER

    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.VERBOSE if _state["level"] <= logging.DEBUG else G_LOGGER.CRITICAL + 1
    try:
        yield
    finally:
        G_LOGGER.module_severity = severity


class Progress:
    """Iterate with progress: a tqdm bar (one line) when `stream` is a terminal; otherwise a line
    "desc: i/n unit (s)" at most every LOG_INTERVAL_S and at the end. `note(text)` says what the
    current step is doing; `alive()` keeps saying so while a long step runs."""

    def __init__(self, iterable, desc: str, unit: str, enabled: bool = True, stream=None,
                 interval: float = LOG_INTERVAL_S):
        self.items = list(iterable)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_shown(enabled)
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.done = 0
        self.start = time.monotonic()
        self.last_line = None
        self.current = ""
        self._lock = threading.Lock()

    def __iter__(self):
        if not self.enabled:
            yield from self.items
            return
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.items), desc=self.desc, unit=self.unit, file=self.stream,
                            dynamic_ncols=True, leave=True)
        try:
            for item in self.items:
                yield item
                self.done += 1
                if self.bar is not None:
                    self.bar.update(1)
                else:
                    self._line(final=self.done == len(self.items))
        finally:
            if self.bar is not None:
                self.bar.close()

    def _line(self, final: bool = False, note: str = "") -> None:
        now = time.monotonic()
        if not final and self.last_line is not None and now - self.last_line < self.interval:
            return
        self.last_line = now
        with self._lock:
            print(f"{self.desc}: {self.done}/{len(self.items)} {self.unit}s{note} ({now - self.start:.0f} s)",
                  file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        self.current = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            self._line(note=f", {text}")

    @contextlib.contextmanager
    def alive(self, text: str):
        """While the block runs, say every `interval` seconds that `text` is still going (a bar's
        postfix on a terminal, a line in a log): a step of minutes never looks hung."""
        if not self.enabled:
            yield
            return
        stop = threading.Event()
        began = time.monotonic()
        self.note(text)

        def beat():
            while not stop.wait(self.interval if self.bar is None else 1.0):
                elapsed = f"{text}, {time.monotonic() - began:.0f} s"
                if self.bar is not None:
                    self.bar.set_postfix_str(elapsed)
                else:
                    self.last_line = None  # a heartbeat is always printed
                    self._line(note=f", still {elapsed}")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
