"""What wildzoo learns from a catalog: probes of model properties (and, next, the backbone)."""
