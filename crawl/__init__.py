"""Crawl sources (local folders, Model Zoos, the Hugging Face Hub) into a wildzoo catalog."""
