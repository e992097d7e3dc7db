"""The real pretrained model: SmolLM2-135M-Instruct as a Hugging Face directory (smollm2.py), the
real task it is measured on (task.py) and the report on the paper's claims (report.py)."""
