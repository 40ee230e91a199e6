"""Recording and replay: event streams as JSON-lines files, and back as live streams.

* :class:`EventRecorder` writes events as JSON lines, one per event, flushed as
  they come; a bus listener and a context manager. :func:`record` drains a
  stream into a file.
* :func:`replay` streams a recording back as a live stream, its original
  timing scaled by ``speed`` (or as fast as possible with ``math.inf``),
  each pause capped at ``max_gap`` recorded seconds (:data:`DEFAULT_MAX_GAP`,
  5 s, unless given), usable wherever a live stream is. :func:`replay_into` re-emits it into a
  bus; :func:`start_replay` plays it into a bus of its own behind a
  :class:`ReplayRun` handle that a server serves like a live run.
* A line that is not an event (not JSON, nested too deeply, truncated, ...)
  raises :exc:`RecordingError` with its line number, after every valid event
  before it. An event that one recorded run would not produce (a gap in the
  seqs, a second terminal event of a run, a second run id) is reported as a
  :class:`RecordingWarning` (to an ``on_warning`` callback, else with
  :func:`warnings.warn`) and replayed all the same.

The format is exactly the output of ``trioflow run --json`` (each line is
:meth:`FlowEvent.to_json <trioflow.FlowEvent.to_json>`), so either can be
replayed, in the terminal with ``trioflow replay FILE [--speed X] [--max-gap S] [--json]``.
"""

from trioflow.recording._recorder import EventRecorder, record
from trioflow.recording._replay import (
    DEFAULT_MAX_GAP,
    MAX_LINE_BYTES,
    RecordingError,
    RecordingWarning,
    ReplayStream,
    WarningHandler,
    empty_recording,
    replay,
    replay_into,
)
from trioflow.recording._replay_run import ReplayRun, start_replay

__all__ = [
    "DEFAULT_MAX_GAP",
    "MAX_LINE_BYTES",
    "EventRecorder",
    "RecordingError",
    "RecordingWarning",
    "ReplayRun",
    "ReplayStream",
    "WarningHandler",
    "empty_recording",
    "record",
    "replay",
    "replay_into",
    "start_replay",
]
