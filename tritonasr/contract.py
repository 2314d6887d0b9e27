"""What clients and servers agree on, written once: the ASR engines and languages a request may
name, the longest stream chunk, and the exit codes of the client commands.

Light on purpose: the client install imports it, and nothing here imports beyond the standard
library.
"""
from __future__ import annotations

ENGINES = ("sensevoice", "parakeet")
LANGUAGES = ("auto", "zh", "en", "yue", "ja", "ko")
# asr_stream refuses longer chunks; its `max_chunk_ms` parameter may lower this, never raise it
# past what the clients send.
MAX_CHUNK_MS = 2000

# The client commands' exit codes. 2 is argparse's own for a usage error.
EXIT_OK = 0
EXIT_FAILED = 1  # a request or file failed (each reported on stderr)
EXIT_USAGE = 2  # bad arguments, or a command this installation lacks the extra for
EXIT_DENIED = 3  # the server refused the caller's key
EXIT_UNREACHABLE = 4  # no server at the address, or the model is not loaded on it
