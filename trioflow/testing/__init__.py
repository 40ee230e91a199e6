"""Testing helpers: local servers that speak the model APIs, for offline tests of the real SDKs.

:func:`open_anthropic_server` runs a local server that speaks the Anthropic
Messages streaming protocol from a script of replies, so that tests drive the
real ``anthropic`` SDK (and :class:`~trioflow.models.AnthropicModel`) over real
HTTP on ``127.0.0.1``. :func:`open_openai_server` does the same for the OpenAI
Chat Completions streaming protocol, the ``openai`` SDK and
:class:`~trioflow.models.OpenAIModel`. Both are :class:`ScriptedServer`
subclasses: they record requests (:class:`RecordedRequest`) and count
connections and responses (:class:`ServerStatistics`) alike.
"""

from trioflow.testing._anthropic_server import (
    AnthropicServer,
    AnthropicServerStatistics,
    DisconnectAfter,
    ErrorEventAfter,
    ErrorReply,
    Reply,
    StreamedReply,
    ToolUse,
    encode_sse,
    open_anthropic_server,
)
from trioflow.testing._openai_server import (
    DONE_FRAME,
    ChatDisconnectAfter,
    ChatError,
    ChatErrorAfter,
    ChatReply,
    OpenAIReply,
    OpenAIServer,
    encode_chunk,
    open_openai_server,
)
from trioflow.testing._scripted_server import RecordedRequest, ScriptedServer, ServerStatistics

__all__ = [
    "DONE_FRAME",
    "AnthropicServer",
    "AnthropicServerStatistics",
    "ChatDisconnectAfter",
    "ChatError",
    "ChatErrorAfter",
    "ChatReply",
    "DisconnectAfter",
    "ErrorEventAfter",
    "ErrorReply",
    "OpenAIReply",
    "OpenAIServer",
    "RecordedRequest",
    "Reply",
    "ScriptedServer",
    "ServerStatistics",
    "StreamedReply",
    "ToolUse",
    "encode_chunk",
    "encode_sse",
    "open_anthropic_server",
    "open_openai_server",
]
