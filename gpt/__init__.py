"""Train GPT language models from the shell, with every run tracked in MLflow."""
