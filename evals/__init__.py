"""MediLoRA evals."""
