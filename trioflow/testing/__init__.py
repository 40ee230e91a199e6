"""Testing helpers.

:func:`open_anthropic_server` runs a local server that speaks the Anthropic
Messages streaming protocol from a script of replies, so that tests drive the
real ``anthropic`` SDK (and :class:`~trioflow.models.AnthropicModel`) over real
HTTP on ``127.0.0.1``.
"""

from trioflow.testing._anthropic_server import (
    AnthropicServer,
    AnthropicServerStatistics,
    DisconnectAfter,
    ErrorEventAfter,
    ErrorReply,
    RecordedRequest,
    Reply,
    StreamedReply,
    ToolUse,
    encode_sse,
    open_anthropic_server,
)

__all__ = [
    "AnthropicServer",
    "AnthropicServerStatistics",
    "DisconnectAfter",
    "ErrorEventAfter",
    "ErrorReply",
    "RecordedRequest",
    "Reply",
    "StreamedReply",
    "ToolUse",
    "encode_sse",
    "open_anthropic_server",
]
