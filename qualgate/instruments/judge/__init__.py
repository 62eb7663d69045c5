"""The judge instrument: LLM-as-judge through the openai client, with bias controls."""
