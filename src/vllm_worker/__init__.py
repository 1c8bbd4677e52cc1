"""A RunPod serverless worker that serves chat LLMs through vLLM."""

__version__ = "0.1.0"
