"""The language-model setting of PAPER.md §2: OLMo-style models, data, injected tasks."""
