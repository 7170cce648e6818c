"""MediLoRA corpora."""
