"""The language-model setting (docs/method.md §6): OLMo-style models, data, injected tasks."""
