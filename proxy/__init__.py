"""llmproxy: a declarative proxy for local LLM servers (see README.md)."""
