"""pf2lora: personalized federated fine-tuning of language models with LoRA."""
