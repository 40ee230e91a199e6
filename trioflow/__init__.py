"""trioflow: stream the execution of LLM agents as typed events, on Trio."""

__version__ = "0.1.0"
